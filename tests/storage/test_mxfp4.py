"""gpt-oss in MXFP4, as OpenAI released it: experts read and dequantized a slice at a time, rebuilt ones
written back as MXFP4 (or everything as bf16 with --output-dtype), loaded by transformers' own MXFP4 code."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import raw_bytes
from transformers import AutoModelForCausalLM, Mxfp4Config

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.publish.verify import verify
from dern_stream.storage import mxfp4
from dern_stream.tiny_models import calibration_tokens, save_mxfp4_copy

LAYER = "model.layers.1.mlp.experts."


@pytest.fixture(scope="module")
def mx(build, tmp_path_factory):
    built = build("gpt_oss", dtype=torch.bfloat16)
    return save_mxfp4_copy(built.model_dir, tmp_path_factory.mktemp("mxfp4") / "model"), built.calib


def _load(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_all_experts_with_alpha_one_is_byte_identical(mx, tmp_path):
    model, calib = mx
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=8, calib=calib, alpha=1.0, progress=False)
    assert raw_bytes(out) == raw_bytes(model)


def test_half_the_experts_in_mxfp4(mx, tmp_path):
    model, calib = mx
    out = tmp_path / "out"
    summary = dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=0.2, progress=False)
    assert summary.segments_reassigned > 0
    rec = json.loads((out / "dern_stream.json").read_text())["layers"]["1"]
    src, dst = raw_bytes(model), Checkpoint(out)
    blocks = dst.load(LAYER + "gate_up_proj_blocks")
    assert blocks.shape[0] == 4 and dst.entries[LAYER + "gate_up_proj_scales"].dtype == "U8"
    size = len(src[LAYER + "gate_up_proj_blocks"]) // 8
    out_bytes = raw_bytes(out)[LAYER + "gate_up_proj_blocks"]
    for pos, expert in enumerate(rec["kept"]):
        if expert not in rec["rebuilt_experts"]:  # unchanged: the input's bytes
            assert out_bytes[pos * size:(pos + 1) * size] == src[LAYER + "gate_up_proj_blocks"][
                expert * size:(expert + 1) * size]
    assert rec["rebuilt_experts"] and 0 < rec["requantization_error"] < 0.2  # MXFP4: 4-bit values
    quantized = _load(out, quantization_config=Mxfp4Config(dequantize=True))
    expected = mxfp4.dequantize(blocks, dst.load(LAYER + "gate_up_proj_scales")).transpose(1, 2)
    assert quantized.model.layers[1].mlp.experts.gate_up_proj.float().equal(expected)
    with torch.no_grad():
        assert torch.isfinite(quantized(torch.tensor([[5, 6, 7, 8]])).logits).all()
    assert not verify(out, model, progress=False).problems


def test_output_dtype_bf16_and_the_streamed_forward(mx, tmp_path):
    model, calib = mx
    ids = calibration_tokens(sequences=4, length=16, seed=3)
    reference = _load(model, quantization_config=Mxfp4Config(dequantize=True))
    with torch.no_grad():
        expected = math.exp(reference(input_ids=ids, labels=ids).loss.item())
    assert dern_stream.evaluate(model, tokens=ids, batch_size=2, progress=False).perplexity == pytest.approx(
        expected, rel=1e-3)
    same = tmp_path / "same"
    dern_stream.rewrite(model, same, experts=8, calib=calib, alpha=1.0, output_dtype="bf16", progress=False)
    config = json.loads((same / "config.json").read_text())
    assert "quantization_config" not in config
    assert Checkpoint(same).entries[LAYER + "gate_up_proj"].dtype == "BF16"
    with torch.no_grad():
        torch.testing.assert_close(_load(same)(ids).logits, reference(ids).logits)
    out = tmp_path / "out"
    dern_stream.rewrite(model, out, experts=4, calib=calib, alpha=0.2, output_dtype="bf16", progress=False)
    with torch.no_grad():
        assert torch.isfinite(_load(out)(ids).logits).all()


@pytest.mark.parametrize("padded", [True, False])
def test_widths_that_are_not_whole_mxfp4_groups_are_refused_before_any_work(padded, build, tmp_path):
    """An expert width of 40 cannot be whole groups of 32: blocks padded to 64, or cut to 32, neither of which
    transformers loads. Refused in one line by rewrite and plan, before any expert is read."""
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from dern_stream.cli import main

    built = build("gpt_oss", intermediate_size=40)
    ckpt, tensors = Checkpoint(built.model_dir), {}
    for name in ckpt.entries:
        weight = ckpt.load(name)
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            rows = weight.transpose(1, 2)
            cols = rows.shape[-1]
            rows = torch.nn.functional.pad(rows, (0, -cols % 32)) if padded else rows[..., : cols // 32 * 32]
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4.quantize(rows)
        else:
            tensors[name] = weight
    model = tmp_path / "model"
    shutil.copytree(built.model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    message = ("error: MXFP4 experts need hidden_size and intermediate_size to be multiples of 32, MXFP4's group; "
               "this config has 64 and 40, a layout transformers does not load either (padded or not)")
    for args in (["rewrite", model, tmp_path / "out", "-k", "4", "--alpha", "0", "--calib", built.calib],
                 ["rewrite", model, tmp_path / "out", "-k", "4", "--alpha", "1", "--calib", built.calib],
                 ["plan", model, "-k", "4"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == message, result.output
        assert not list(tmp_path.glob("*out*"))
