"""Multimodal checkpoints whose language model is an MoE family (Qwen3-VL-MoE, Qwen3.5-MoE, Llama 4, Gemma 4): the
config read from and written back to its sections, the vision tower untouched, and Qwen3-VL-MoE's experts in either
orientation transformers loads (the Hub's [N, d, 2h] / [N, h, d], or the [N, 2h, d] / [N, d, h] it saves)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, load_model, raw_bytes
from safetensors.torch import load_file, save_file

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.checkpoint.config_view import text_section
from dern_stream.cli import main

MULTIMODAL = ["gemma4", "glm4v_moe", "llama4", "qwen3_5_moe", "qwen3_omni_moe", "qwen3_omni_moe_thinker",
              "qwen3_vl_moe"]


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
    # Only the language model's expert count changes, in its section (Qwen3-Omni-MoE: thinker_config.text_config);
    # the top level and the towers' sections as they were
    section = text_section(src)
    src_text, dst_text = src, dst
    for key in section:
        src_text, dst_text = src_text[key], dst_text[key]
    changed = {k for k in {*src_text, *dst_text} if src_text.get(k) != dst_text.get(k)}
    assert changed == {k for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in src_text}
    assert all(dst_text[k] == 4 for k in changed)
    dst_text.update({k: src_text[k] for k in changed})
    assert dst == src
    before, after = raw_bytes(built.model_dir), raw_bytes(out)
    tower = [n for n in before if any(t in n for t in ("vision", "visual", "multi_modal_projector", "audio", "talker"))]
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


def test_a_square_width_in_the_hub_orientation_is_refused(build, tmp_path):
    """At --intermediate-size d/2 the Hub-oriented gate_up [K, d, 2h] would be square, which transformers reads as its
    own [K, 2h, d]: refused in one line, nothing written."""
    built = build("qwen3_vl_moe", moe_intermediate_size=48)
    hub = _hub_layout(built.model_dir, tmp_path / "hub")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(hub), str(out), "--experts", "4", "--calib", str(built.calib),
                                       "--intermediate-size", "32"])
    assert_clean_failure(result, out, "--intermediate-size 32 makes the experts' gate_up_proj [K, 64, 64]")
    dern_stream.rewrite(hub, out, experts=4, calib=built.calib, intermediate_size=24, progress=False)  # not square
    assert Checkpoint(out).entries["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 48)


def test_the_language_model_is_read_from_its_section_alone(build, tmp_path):
    """transformers builds the language model from text_config only: a top-level key of the same name is neither read
    nor rewritten, and a key text_config lacks is missing (not taken from the top level)."""
    built = build("qwen3_vl_moe")
    src = tmp_path / "in"
    shutil.copytree(built.model_dir, src)
    config = json.loads((src / "config.json").read_text())
    config["num_experts"] = 16  # (ignored by transformers: text_config says num_local_experts 8)
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    dern_stream.rewrite(src, out, experts=4, calib=built.calib, progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["num_experts"] == 16 and written["text_config"]["num_local_experts"] == 4
    top_k = config["text_config"].pop("num_experts_per_tok")
    config["num_experts_per_tok"] = top_k
    (src / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "out2"), "--experts", "4",
                                       "--calib", str(built.calib)])
    assert_clean_failure(result, tmp_path / "out2", "num_experts_per_tok")
