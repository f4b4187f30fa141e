"""A quantized weight whose stored bytes are all finite but whose dequantized values are not (an FP8 block scale of
3e38; an MXFP4 scale byte of 255, or of 254 under an E2M1 value of 6) is no success: rewrite refuses it, naming the
tensor and the cause, `--output-dtype bf16` names the same cause, and verify reports it."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import read_tensors
from safetensors.torch import save_file

from dern_stream.cli import main
from dern_stream.publish.verify import verify
from dern_stream.tiny_models import save_fp8_copy, save_mxfp4_copy

ATTENTION = "model.layers.1.self_attn.o_proj.weight"  # not an expert: copied as it is
EXPERTS = "model.layers.1.mlp.experts.gate_up_proj"


def _edited(model, dest, edit):
    shutil.copytree(model, dest)
    tensors = read_tensors(dest)
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _refusal(args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return result.stderr.strip().splitlines()[-1]


def test_an_fp8_scale_that_overflows_the_weight_is_refused_and_reported(build, tmp_path):
    built = build("deepseek_v3", dtype=torch.bfloat16)
    fp8 = save_fp8_copy(built.model_dir, tmp_path / "fp8")

    def huge_scale(tensors):
        tensors[ATTENTION + "_scale_inv"][0, 0] = 3e38

    bad = _edited(fp8, tmp_path / "bad", huge_scale)
    cause = f"{ATTENTION} dequantizes to NaN or Inf (its block scales reach 3e+38)"
    for extra in ([], ["--output-dtype", "bf16"]):
        line = _refusal(["rewrite", bad, tmp_path / "out", "-k", "4", "--calib", built.calib, *extra])
        assert line == f"error: {cause}: the input weights are not finite", line
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    report = verify(bad, progress=False)
    assert cause in report.problems and not report.ok


@pytest.mark.parametrize("scale, nibble", [(255, 0x1), (254, 0x7)])
def test_mxfp4_scales_beyond_the_range_are_refused_and_reported(scale, nibble, build, tmp_path):
    built = build("gpt_oss", dtype=torch.bfloat16)
    mx = save_mxfp4_copy(built.model_dir, tmp_path / "mx")

    def overflow(tensors):
        tensors[EXPERTS + "_blocks"][2, 0, 0, 0] = nibble
        tensors[EXPERTS + "_scales"][2, 0, 0] = scale

    bad = _edited(mx, tmp_path / "bad", overflow)
    what = "a scale byte of 255 (NaN)" if scale == 255 else "scales up to 2^127"
    cause = f"{EXPERTS} dequantizes to NaN or Inf ({what})"
    line = _refusal(["rewrite", bad, tmp_path / "out", "-k", "8", "--alpha", "1", "--calib", built.calib])
    assert line == f"error: {cause}: the input weights are not finite", line
    line = _refusal(["rewrite", bad, tmp_path / "out", "-k", "8", "--alpha", "1", "--calib", built.calib,
                     "--output-dtype", "bf16"])
    assert cause in line, line
    assert not (tmp_path / "out").exists()
    assert cause in verify(bad, progress=False).problems
