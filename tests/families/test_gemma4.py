"""Gemma 4's text model: the router and experts on the decoder layer, the router reading its own normalisation of the
residual stream (recovered exactly from the experts' input the dump holds), and router.per_expert_scale [N] carried
with the experts (folded into a rebuilt expert's down projection, kept as it was for an unchanged one)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, edited_copy, raw_bytes, read_tensors, routed_error
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.experts.forward import layer_routing
from dern_stream.families import family_for
from dern_stream.layout.moe_layers import ModelShape, check_moe_layers
from dern_stream.rewriter.layer_io import read_layer

FAMILY = "gemma4_text"
SCALE = "router.per_expert_scale"


def test_the_router_input_scale_gives_transformers_routing_from_the_experts_input(build):
    """The router's logits are (y * c) @ proj^T on the experts' input y, c = scale / w * d^-0.5: the same experts and
    weights (times per_expert_scale) as transformers' router on the residual stream, to float32 rounding."""
    built = build(FAMILY)
    ckpt = Checkpoint(built.model_dir)
    fam = family_for(ckpt.config)
    shape = ModelShape(fam.num_experts(ckpt.config), ckpt.config["hidden_size"], fam.intermediate_size(ckpt.config))
    model = AutoModelForCausalLM.from_pretrained(built.model_dir).eval()
    seen: dict[str, torch.Tensor] = {}
    layer_module = model.model.layers[1]
    hooks = [layer_module.router.register_forward_pre_hook(lambda _m, args: seen.__setitem__("residual", args[0])),
             layer_module.experts.register_forward_pre_hook(lambda _m, args: seen.__setitem__("y", args[0]))]
    with torch.no_grad():
        model(torch.randint(3, 250, (2, 16)))
        _, weights, idx = layer_module.router(seen["residual"])
    for hook in hooks:
        hook.remove()
    layer = next(layer for layer in check_moe_layers(ckpt, fam, shape) if layer.index == 1)
    inputs = read_layer(ckpt, fam, layer, shape, with_experts=False)
    gating = inputs.layer_routing(layer_routing(fam, ckpt.config, ckpt.config)).before
    assert gating.input_scale is not None and not torch.allclose(gating.input_scale, gating.input_scale[0])
    ours_idx, ours = gating.weights(seen["y"], inputs.router, None)
    assert torch.equal(ours_idx, idx)
    per_expert = ckpt.load(f"model.layers.1.{SCALE}")
    torch.testing.assert_close(ours * per_expert[ours_idx], weights, rtol=1e-5, atol=1e-6)
    # without the scale the routing differs: the test's norms and scales are not all ones
    assert not torch.allclose(replace(gating, input_scale=None).weights(seen["y"], inputs.router, None)[1], ours)


def test_pruning_keeps_router_rows_and_expert_scales_byte_identical(build, tmp_path):
    built = build(FAMILY)
    fam = family_for(built.config)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, method="prune", progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    src, dst = raw_bytes(built.model_dir), raw_bytes(out)
    tensors = read_tensors(built.model_dir)
    for i, rec in audit["layers"].items():
        kept, prefix = rec["kept"], f"model.layers.{i}."
        for name in (fam.router_name(int(i)), prefix + SCALE):
            assert dst[name] == tensors[name][kept].contiguous().numpy().tobytes()
        for name in ("router.scale", "pre_feedforward_layernorm_2.weight", "mlp.gate_proj.weight"):
            assert dst[prefix + name] == src[prefix + name]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["top_k_experts"]) == (4, 2)
    verified = CliRunner().invoke(main, ["verify", str(out), "--against", str(built.model_dir)])
    assert verified.exit_code == 0, verified.output


def test_a_merged_expert_holds_its_scale_and_the_output_computes_the_recorded_error(build, tmp_path):
    """DERN's merged (and refitted) experts fold per_expert_scale into their down projection and are written with
    scale 1; unchanged experts keep theirs. The output, loaded in transformers, computes the error the rewrite
    recorded for each layer, so it routes and scales as the rewrite computed it, and eval measures it so too."""
    built = build(FAMILY)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, refit=True, fit_tokens=10**6,
                        progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    src, dst = read_tensors(built.model_dir), read_tensors(out)
    original = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32)
    rewritten = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dump = CalibDump(built.calib)
    rebuilt_any = False
    for i, rec in audit["layers"].items():
        scale, before = dst[f"model.layers.{i}.{SCALE}"], src[f"model.layers.{i}.{SCALE}"]
        for pos, expert in enumerate(rec["kept"]):
            rebuilt = expert in rec["rebuilt_experts"]
            rebuilt_any |= rebuilt
            assert scale[pos] == (1.0 if rebuilt else before[expert])
        x = torch.cat(list(dump.chunks(int(i)))).float()
        error = rec["output_error"]["error"]
        assert error == pytest.approx(routed_error(original, rewritten, int(i), x, x), rel=1e-3)
    assert rebuilt_any
    # eval's per-layer error (its MoE computation on the dump's inputs, in both checkpoints) measures the same
    report = dern_stream.evaluate(out, reference=built.model_dir, calib=built.calib, progress=False)
    for e in report.layer_errors:
        assert e.rel_l2 == pytest.approx(audit["layers"][str(e.layer)]["output_error"]["error"], rel=1e-3)
    verified = CliRunner().invoke(main, ["verify", str(out), "--against", str(built.model_dir)])
    assert verified.exit_code == 0, verified.output


def test_intermediate_size_changes_the_experts_not_the_dense_mlp(build, tmp_path):
    built = build(FAMILY)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, intermediate_size=16, calib=built.calib, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["intermediate_size"]) == (16, built.config["intermediate_size"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].experts.down_proj.shape == (4, built.config["hidden_size"], 16)
    assert torch.isfinite(model(torch.randint(3, 250, (1, 12))).logits).all()


def test_a_dense_gemma4_is_refused_in_one_line(build, tmp_path):
    built = build(FAMILY)
    bad = edited_copy(built.model_dir, tmp_path / "bad", enable_moe_block=False)
    result = CliRunner().invoke(main, ["rewrite", str(bad), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib)])
    assert_clean_failure(result, tmp_path / "out", "not a Mixture-of-Experts model")


def test_a_zero_in_the_experts_norm_is_refused_in_one_line(build, tmp_path):
    """The router's input is recovered from the experts' by dividing by the norm's weight: a zero entry loses it."""
    built = build(FAMILY)
    bad = edited_copy(built.model_dir, tmp_path / "bad")
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.pre_feedforward_layernorm_2.weight"][3] = 0.0
    save_file(tensors, shard, metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["rewrite", str(bad), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib)])
    assert_clean_failure(result, tmp_path / "out", "pre_feedforward_layernorm_2.weight has a zero entry")
