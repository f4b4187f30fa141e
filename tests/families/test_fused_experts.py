"""Fused expert layouts (Granite [N, 2h, d] gate|up rows, Llama-4 [N, d, 2h] gate|up columns): expert e is
read with one pread of its byte range, and written back in the same layout with K experts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import raw_bytes

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.families import family_for
from dern_stream.layout.moe_layers import ModelShape, check_moe_layers
from dern_stream.rewriter.layer_io import read_experts

FUSED = ["granitemoe", "llama4_text"]


def _layers(built):
    ckpt = Checkpoint(built.model_dir)
    fam = family_for(ckpt.config)
    shape = ModelShape(fam.num_experts(ckpt.config), ckpt.config["hidden_size"], fam.intermediate_size(ckpt.config))
    return ckpt, fam, shape, check_moe_layers(ckpt, fam, shape)


@pytest.mark.parametrize("family", FUSED)
def test_each_expert_is_one_pread_of_its_slice(family, build, monkeypatch):
    built = build(family)
    ckpt, fam, shape, layers = _layers(built)
    reads = []
    original = ckpt._pread_fully
    monkeypatch.setattr(ckpt, "_pread_fully", lambda file, offset, view, what: (
        reads.append((what, offset, len(view))), original(file, offset, view, what))[1])
    layer = layers[0]
    stack = read_experts(ckpt, fam, layer, shape, torch.device("cpu"))
    for name in fam.fused_names(layer.index):
        entry = ckpt.entries[name]
        slice_bytes = entry.nbytes // shape.num_experts
        mine = [(offset, size) for what, offset, size in reads if name in what]
        assert mine == [(entry.start + e * slice_bytes, slice_bytes) for e in range(shape.num_experts)]
    # and the slices land as gate [h, d], up [h, d], down [d, h] of each expert
    gate_up, down = (ckpt.load(n) for n in fam.fused_names(layer.index))
    h = shape.intermediate
    for e in (0, shape.num_experts - 1):
        rows = gate_up[e].T if fam.fused.gate_up_cols else gate_up[e]
        assert stack.gate[e].equal(rows[:h]) and stack.up[e].equal(rows[h:])
        assert stack.down[e].equal(down[e].T if fam.fused.down_cols else down[e])


@pytest.mark.parametrize("family", FUSED)
def test_rebuilt_and_kept_experts_in_the_fused_layout(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=0.2, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    src, dst = Checkpoint(built.model_dir), Checkpoint(out)
    fam = family_for(src.config)
    moved = 0
    for layer, rec in audit["layers"].items():
        for name in fam.fused_names(int(layer)):
            before, after = src.load(name), dst.load(name)
            assert after.shape == (4, *before.shape[1:]) and after.dtype == before.dtype
            for pos, expert in enumerate(rec["kept"]):
                if expert in rec["rebuilt_experts"]:
                    moved += 1
                else:  # untouched: the input slice's bytes
                    assert after[pos].view(torch.uint8).equal(before[expert].view(torch.uint8))
    assert moved > 0
    untouched = [n for n in src.entries if not any(fam.is_layer_expert_tensor(int(i), n) or n == fam.router_name(int(i))
                                                     for i in audit["layers"])]
    src_bytes, dst_bytes = raw_bytes(built.model_dir), raw_bytes(out)
    assert all(dst_bytes[n] == src_bytes[n] for n in untouched)
