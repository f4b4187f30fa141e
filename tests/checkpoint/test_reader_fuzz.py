"""Corrupt indexes and calibration dumps: every input gives a result or a one-line DernError, never
another exception and never a hang (the header parser has its own fuzz test, test_header_fuzz.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dern_stream.calib import CalibDump, CalibWriter
from dern_stream.checkpoint import Checkpoint
from dern_stream.checkpoint.source import INDEX_NAME
from dern_stream.errors import DernError
from dern_stream.tiny_models import build_model, save_model

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def clean_error(e: DernError) -> None:
    assert str(e) and "\n" not in str(e)


_MODEL: dict = {}


def sharded_model(tmp_path_factory) -> Path:
    if "dir" not in _MODEL:
        _MODEL["dir"] = save_model(build_model("mixtral"), tmp_path_factory.mktemp("fuzz") / "model", "100KB")
    return _MODEL["dir"]


@_SETTINGS
@given(data=st.data())
def test_corrupt_index(tmp_path_factory, data):
    src = sharded_model(tmp_path_factory)
    d = tmp_path_factory.mktemp("idx")
    for f in src.iterdir():
        (d / f.name).symlink_to(f)
    (d / INDEX_NAME).unlink()
    index = json.loads((src / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    kind = data.draw(st.sampled_from(["bytes", "json", "entries"]))
    if kind == "bytes":
        (d / INDEX_NAME).write_bytes(data.draw(st.binary(max_size=200)))
    elif kind == "json":
        (d / INDEX_NAME).write_text(json.dumps(data.draw(_json)))
    else:  # a real index with some entries replaced by arbitrary names and files
        wm = dict(index["weight_map"])
        for _ in range(data.draw(st.integers(1, 4))):
            name = data.draw(st.sampled_from(sorted(wm)) | st.text(max_size=12))
            wm[name] = data.draw(st.sampled_from(shards) | st.text(max_size=12) | _json
                                 | st.just("../" + shards[0]) | st.just("model.safetensors.index.json"))
        (d / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    try:
        ckpt = Checkpoint(d)
    except DernError as e:
        clean_error(e)
        return
    assert all(Path(e.file).parent == d for e in ckpt.entries.values())  # nothing read from outside


def _write_dump(path: Path) -> None:
    w = CalibWriter(path, model_type="mixtral", hidden_size=8, num_experts=4, moe_layers=[0, 1], chunk_tokens=16)
    rng = np.random.default_rng(0)
    for layer in (0, 1):
        w.append(layer, rng.standard_normal((40, 8)).astype(np.float16))
        w.finish_layer(layer)


def _read_everything(path: Path) -> None:
    dump = CalibDump(path)
    dump.check_matches("mixtral", 8, 4)
    for layer in dump.attrs["moe_layers"]:
        for chunk in dump.chunks(layer):
            assert chunk.dtype == torch.float32 and chunk.shape[1] == 8


@_SETTINGS
@given(data=st.data())
def test_corrupt_dump(tmp_path_factory, data):
    template = tmp_path_factory.getbasetemp() / "dump-template.zarr"
    if not template.exists():
        _write_dump(template)
    path = tmp_path_factory.mktemp("dump") / "calib.zarr"
    shutil.copytree(template, path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files))
    kind = data.draw(st.sampled_from(["bytes", "truncate", "json", "delete"]))
    if kind == "bytes":
        target.write_bytes(data.draw(st.binary(max_size=300)))
    elif kind == "truncate":
        raw = target.read_bytes()
        target.write_bytes(raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))])
    elif kind == "json" and target.name == "zarr.json":
        meta = json.loads(target.read_text())
        key = data.draw(st.sampled_from(sorted(meta)))
        if isinstance(meta[key], dict) and meta[key] and data.draw(st.booleans()):
            sub = data.draw(st.sampled_from(sorted(meta[key])))
            meta[key][sub] = data.draw(_json)
        else:
            meta[key] = data.draw(_json)
        target.write_text(json.dumps(meta))
    else:
        target.unlink()
    try:
        _read_everything(path)
    except DernError as e:
        clean_error(e)
