"""The calibration dump store: what the writer stores is what the reader yields, chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dern_stream.calib import CalibDump, CalibWriter, store
from dern_stream.errors import DernError


def test_round_trip_in_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 16)).astype(np.float32) for n in (10, 7, 20)]
    writer = CalibWriter(tmp_path / "d.zarr", model_type="mixtral", hidden_size=16, num_experts=4, moe_layers=[2],
                         chunk_tokens=8)
    for part in parts:
        writer.append(2, torch.from_numpy(part).view(1, -1, 16), router_sha256="abc")
    writer.finish_layer(2)
    dump = CalibDump(tmp_path / "d.zarr")
    assert [c.shape[0] for c in dump.chunks(2)] == [37]  # small: one read
    monkeypatch.setattr(store, "_READ_BLOCK", 2 * 8 * 16 * 4)  # two stored chunks of float32 per read
    chunks = list(dump.chunks(2))
    assert [c.shape[0] for c in chunks] == [16, 16, 5]
    assert all(c.dtype == torch.float32 for c in chunks)
    expected = np.concatenate(parts).astype(np.float16).astype(np.float32)
    assert np.array_equal(torch.cat(chunks).numpy(), expected)
    dump.check_matches("mixtral", 16, 4)
    with pytest.raises(DernError, match="another model"):
        dump.check_matches("mixtral", 16, 8)
    assert dump.layer(2).attrs["router_sha256"] == "abc"


def test_incomplete_layer_and_foreign_stores_are_refused(tmp_path):
    writer = CalibWriter(tmp_path / "d.zarr", model_type="olmoe", hidden_size=4, num_experts=2, moe_layers=[0])
    writer.append(0, np.ones((3, 4)))
    with pytest.raises(DernError, match="layer 0 is incomplete"):
        CalibDump(tmp_path / "d.zarr").layer(0)
    with pytest.raises(DernError, match="no inputs for MoE layer 1"):
        CalibDump(tmp_path / "d.zarr").layer(1)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DernError, match="not a zarr v3 calibration dump|not a dern-stream calibration dump"):
        CalibDump(tmp_path / "plain")
    with pytest.raises(DernError, match="already exists"):
        CalibWriter(tmp_path / "d.zarr", model_type="olmoe", hidden_size=4, num_experts=2, moe_layers=[0])
