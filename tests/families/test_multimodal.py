"""Multimodal checkpoints whose language model is an MoE family (Qwen3-VL-MoE, Qwen3.5-MoE, Llama 4, Gemma 4): the
config read from and written back to its sections, the vision tower untouched, and Qwen3-VL-MoE's experts in either
orientation transformers loads (the Hub's [N, d, 2h] / [N, h, d], or the [N, 2h, d] / [N, d, h] it saves)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import load_model, raw_bytes
from safetensors.torch import load_file, save_file

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main

MULTIMODAL = ["gemma4", "llama4", "qwen3_5_moe", "qwen3_vl_moe"]


def _logits(directory, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(directory).eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", MULTIMODAL)
def test_config_sections_and_the_vision_tower(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, progress=False)
    src = json.loads((built.model_dir / "config.json").read_text())
    dst = json.loads((out / "config.json").read_text())
    # Only the language model's expert count changes, in text_config; the top level and the towers' sections as read
    assert {k: v for k, v in dst.items() if k != "text_config"} == {k: v for k, v in src.items() if k != "text_config"}
    changed = {k for k in {*src["text_config"], *dst["text_config"]}
               if src["text_config"].get(k) != dst["text_config"].get(k)}
    assert changed == {k for k in ("num_experts", "num_local_experts") if k in src["text_config"]}
    assert all(dst["text_config"][k] == 4 for k in changed)
    before, after = raw_bytes(built.model_dir), raw_bytes(out)
    tower = [n for n in before if "vision" in n or "visual" in n or "multi_modal_projector" in n]
    assert tower and all(after[n] == before[n] for n in tower)
    assert Checkpoint(out).config["model_type"] == family  # (the view keeps the top level's identity)


def _hub_layout(src, dst):
    """`src` (Qwen3-VL-MoE as transformers saves it) with its experts stored as the Hub release stores them."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    flipped = {n: (t.transpose(1, 2).contiguous() if n.endswith(("experts.gate_up_proj", "experts.down_proj")) else t)
               for n, t in tensors.items()}
    save_file(flipped, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_qwen3_vl_moe_experts_in_the_hub_orientation(build, tmp_path):
    d, h = 64, 16  # (2h != d: transformers takes a square gate_up as stored, whichever way it was written)
    built = build("qwen3_vl_moe", moe_intermediate_size=h)
    hub = _hub_layout(built.model_dir, tmp_path / "hub")
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert Checkpoint(hub).entries[gate_up].shape == (8, d, 2 * h)
    assert Checkpoint(built.model_dir).entries[gate_up].shape == (8, 2 * h, d)
    ids = torch.randint(3, 250, (2, 12))
    assert torch.equal(_logits(hub, ids), _logits(built.model_dir, ids))  # transformers reads both as one model

    # The same rewrite of either: the output keeps its input's orientation, and both load as the same model
    outs = {}
    for name, source in (("saved", built.model_dir), ("hub", hub)):
        outs[name] = tmp_path / f"out-{name}"
        dern_stream.rewrite(source, outs[name], experts=4, calib=built.calib, progress=False)
    assert Checkpoint(outs["hub"]).entries[gate_up].shape == (4, d, 2 * h)
    assert Checkpoint(outs["saved"]).entries[gate_up].shape == (4, 2 * h, d)
    assert torch.equal(_logits(outs["hub"], ids), _logits(outs["saved"], ids))
    result = CliRunner().invoke(main, ["verify", str(outs["hub"]), "--against", str(hub)])
    assert result.exit_code == 0 and result.output.rstrip().endswith("OK"), result.output

    # Keeping every expert unchanged is the identity, byte for byte
    same = tmp_path / "same"
    dern_stream.rewrite(hub, same, experts=8, calib=built.calib, alpha=1.0, progress=False)
    assert raw_bytes(same) == raw_bytes(hub)

    # The streamed dump reads the stored orientation as transformers does: the same MoE inputs as the saved layout's
    text = str(built.model_dir.parent / "corpus.txt")
    dumps = {}
    for name, source in (("saved", built.model_dir), ("hub", hub)):
        dumps[name] = tmp_path / f"{name}.zarr"
        result = CliRunner().invoke(main, ["dump", str(source), str(dumps[name]), "--text", text, "--num-tokens", "256",
                                           "--seq-len", "64"])
        assert result.exit_code == 0, result.output
    a, b = CalibDump(dumps["saved"]), CalibDump(dumps["hub"])
    assert a.attrs["moe_layers"] == [0, 1, 2]
    for layer in a.attrs["moe_layers"]:
        assert torch.equal(torch.cat(list(a.chunks(layer))), torch.cat(list(b.chunks(layer))))
