"""The CUDA path: rewrite and dump on the GPU against the same on the CPU. Skipped where torch sees no CUDA
device (then `benchmarks/gpu_check.py` is the first thing to run on a machine that has one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from helpers import fp8_stack, raw_bytes
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.tiny_models import calibration_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_pruning_on_cuda_writes_what_the_cpu_writes(build, tmp_path):
    """alpha = 1: the kept experts (ranked on the GPU) are copied as bytes, so both outputs are the same."""
    built = build("qwen3_moe")
    for device in ("cpu", "cuda"):
        dern_stream.rewrite(built.model_dir, tmp_path / device, experts=4, calib=built.calib, alpha=1.0,
                            device=device, progress=False)
    assert raw_bytes(tmp_path / "cuda") == raw_bytes(tmp_path / "cpu")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_dern_on_cuda_matches_the_cpu(family, build, tmp_path):
    built = build(family)
    for device in ("cpu", "cuda"):
        dern_stream.rewrite(built.model_dir, tmp_path / device, experts=4, calib=built.calib, alpha=0.2,
                            device=device, progress=False)
    ids = calibration_tokens(sequences=2, length=16, seed=4)
    with torch.no_grad():
        cpu, gpu = (AutoModelForCausalLM.from_pretrained(tmp_path / d)(ids).logits for d in ("cpu", "cuda"))
    assert torch.linalg.vector_norm(gpu - cpu) / torch.linalg.vector_norm(cpu) < 2e-2


@pytest.mark.parametrize("group", [None, 2])
def test_the_recipe_with_gradient_steps_on_cuda_fits_as_well_as_on_the_cpu(group, build, tmp_path):
    """The minibatches are drawn by each device's own generator, so the weights differ; the fit must not. With
    `refit_group`, the experts move two at a time."""
    built = build("qwen2_moe")
    errors = {}
    for device in ("cpu", "cuda"):
        dern_stream.rewrite(built.model_dir, tmp_path / device, experts=4, calib=built.calib, recipe="best",
                            refit_steps=50, refit_group=group, device=device, progress=False)
        record = json.loads((tmp_path / device / "dern_stream.json").read_text())
        errors[device] = [layer["output_error"]["error"] for layer in record["layers"].values()]
        AutoModelForCausalLM.from_pretrained(tmp_path / device)
    for cpu, gpu in zip(errors["cpu"], errors["cuda"], strict=True):
        assert gpu == pytest.approx(cpu, rel=0.1)


@pytest.mark.parametrize("options", [{}, {"recipe": "best", "refit_steps": 50},
                                     {"recipe": "best", "refit_steps": 50, "refit_group": 2}],
                         ids=["dern", "recipe", "recipe-groups"])
def test_two_rewrites_on_cuda_write_the_same_bytes(options, build, tmp_path):
    """What resuming on CUDA rests on: deterministic kernels (device.deterministic_kernels), the gradient steps'
    backward included."""
    built = build("qwen2_moe")
    for run in ("a", "b"):
        dern_stream.rewrite(built.model_dir, tmp_path / run, experts=4, calib=built.calib, alpha=0.2, device="cuda",
                            progress=False, **options)
    assert raw_bytes(tmp_path / "a") == raw_bytes(tmp_path / "b")


def test_dump_on_cuda_matches_the_cpu(build, tmp_path):
    built = build("mixtral")
    ids = calibration_tokens(sequences=4, length=16, seed=2)
    for device in ("cpu", "cuda"):
        dern_stream.dump(built.model_dir, tmp_path / f"{device}.zarr", tokens=ids, device=device, progress=False)
    cpu, gpu = CalibDump(tmp_path / "cpu.zarr"), CalibDump(tmp_path / "cuda.zarr")
    for layer in cpu.attrs["moe_layers"]:
        a, b = np.asarray(cpu.layer(layer)[:]), np.asarray(gpu.layer(layer)[:])
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-3)
    assert zarr.open_group(str(tmp_path / "cuda.zarr")).attrs["complete"]


def test_fp8_experts_read_on_cuda_as_on_the_cpu():
    stack, dense = fp8_stack(5, 40, 24, (16, 8))
    gpu = stack.to(torch.device("cuda"))
    for part in ("gate", "up", "down"):
        torch.testing.assert_close(gpu.weight(part, 3).cpu(), dense.weight(part, 3), rtol=0, atol=0)
    experts, segments = torch.tensor([0, 4, 2]), torch.tensor([39, 0, 17])
    mine, theirs = torch.empty(3, 72, device="cuda"), torch.empty(3, 72)
    gpu.segment_rows_into(mine, experts.cuda(), segments.cuda())
    dense.segment_rows_into(theirs, experts, segments)
    torch.testing.assert_close(mine.cpu(), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"recipe": "best"}], ids=["dern", "recipe"])
def test_plan_bounds_the_device_memory_of_a_rewrite(options, tmp_path):
    """The plan's device-memory estimate against torch's peak allocation during a rewrite on CUDA (the recipe's
    gradient steps included)."""
    from dern_stream.synthetic import write_synthetic, write_synthetic_dump

    src = write_synthetic(tmp_path / "ck", layers=2, hidden=512, intermediate=1024, experts=16, upcycled=0.3,
                          vocab=2048)
    dump = write_synthetic_dump(src, tmp_path / "calib.zarr", tokens=1024)
    estimate = dern_stream.plan(src, experts=8, calib=dump, device="cuda", progress=False,
                                **options).estimates.device_peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests left: other threads' cuBLAS workspaces, say
    dern_stream.rewrite(src, tmp_path / "out", experts=8, calib=dump, device="cuda", progress=False, **options)
    assert torch.cuda.max_memory_allocated() - before <= estimate
