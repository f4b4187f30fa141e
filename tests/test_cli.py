"""The command line: a summary on success; one clear line, exit 2 and nothing left behind on bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import raw_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from dern_stream.calib import CalibDump, CalibWriter
from dern_stream.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(result, out, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()  # progress bars may come first, on stderr too
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".dern-" in p.name]


def test_rewrite_prints_a_summary(build, tmp_path):
    built = build("mixtral")
    result = run("rewrite", built.model_dir, tmp_path / "out", "--experts", 4, "--calib", built.calib, "-q",
                 "--alpha", "0.2", "--sim-components", "gate,up,down", "--kmeans-iters", 5)
    assert result.exit_code == 0, result.output
    assert "3 MoE layers of mixtral, experts 8 -> 4" in result.stdout
    assert "segments reassigned:" in result.stdout and "output:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experts", 0], "--experts must be a positive integer"),
        (["--experts", 9], "--experts 9 exceeds the model's 8 experts"),
        (["--experts", 4, "--alpha", 1.5], "--alpha must lie in [0, 1]"),
        (["--experts", 4, "--sim-components", "up,left"], "--sim-components must be a non-empty subset"),
        (["--experts", 4, "--intermediate-size", 64], "can only shrink"),
        (["--experts", 4, "--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["--experts", 4, "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_bad_options(args, message, build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--calib", built.calib, *args), out, message)


def test_missing_input(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", tmp_path / "nope", out, "--experts", 2, "--calib", tmp_path), out,
                         "does not exist")


def test_calibration_is_required_unless_router_norm(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 4), out, "--calib DUMP is required")


def test_dense_model_is_refused_as_not_moe(tmp_path):
    src = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(src)
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", src, out, "--experts", 2, "--importance", "router-norm"), out,
                         "model_type 'llama' is not a Mixture-of-Experts model (config.json has no expert count); "
                         "dern-stream shrinks MoE models: deepseek_v2, deepseek_v3, mixtral")


def test_unsupported_moe_family_names_the_supported_ones(build, tmp_path):
    src = tmp_path / "phimoe"
    shutil.copytree(build("mixtral").model_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "phimoe"}))
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", src, out, "--experts", 2, "--importance", "router-norm"), out,
                         "model_type 'phimoe' is not supported; supported families: deepseek_v2, deepseek_v3, mixtral")


def test_moe_family_without_moe_layers(build, tmp_path):
    built = build("qwen3_moe", mlp_only_layers=[0, 1, 2])
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 2, "--importance", "router-norm"), out,
                         "no MoE layers found")


def test_dump_from_another_model_is_refused(build, tmp_path):
    built, other = build("mixtral"), build("mixtral", seed=7)
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 4, "--calib", other.calib), out,
                         "was made from another model (layer 0 router weights differ)")
    qwen = build("qwen2_moe")
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 4, "--calib", qwen.calib), out,
                         "was made from another model")


def test_failure_mid_run_leaves_no_output(build, tmp_path):
    """Layer 0 is written before layer 1's NaN input is found; the partial output must vanish."""
    built = build("mixtral")
    src = CalibDump(built.calib)
    bad = CalibWriter(tmp_path / "bad.zarr", model_type="mixtral", hidden_size=64, num_experts=8,
                      moe_layers=[0, 1, 2], chunk_tokens=64)
    for layer in (0, 1, 2):
        arr = src.layer(layer)
        data = np.asarray(arr[:]).copy()
        if layer == 1:
            data[100, 3] = np.nan
        bad.append(layer, data, router_sha256=arr.attrs["router_sha256"])
        bad.finish_layer(layer)
    out = tmp_path / "out"
    assert_clean_failure(run("rewrite", built.model_dir, out, "--experts", 4, "--calib", tmp_path / "bad.zarr"),
                         out, "layer 1 holds NaN or Inf")


def test_output_location_rules(build, tmp_path):
    built = build("mixtral")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    before = raw_bytes(src)
    inside = src / "out"
    result = run("rewrite", src, inside, "--experts", 4, "--calib", built.calib)
    assert result.exit_code == 2 and "inside it" in result.stderr and not inside.exists()
    result = run("rewrite", src, tmp_path, "--experts", 4, "--calib", built.calib, "--overwrite")
    assert result.exit_code == 2 and "contains the input" in result.stderr

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run("rewrite", src, out, "--experts", 4, "--calib", built.calib)
    assert result.exit_code == 2 and "pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    result = run("rewrite", src, out, "--experts", 4, "--calib", built.calib, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert raw_bytes(src) == before


@pytest.mark.parametrize("call", ["pwrite", "copy_file_range"])
def test_disk_full_mid_write_leaves_no_output(call, build, tmp_path, monkeypatch):
    """Writes go through pwrite (computed tensors) and copy_file_range (untouched ones): fail either."""
    built = build("mixtral")
    real, calls = getattr(os, call), []

    def fail_after_three(*args):
        calls.append(args)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, call, fail_after_three)
    out = tmp_path / "out"
    result = run("rewrite", built.model_dir, out, "--experts", 4, "--calib", built.calib, "-q", "--alpha", "0.2")
    assert len(calls) > 3
    assert_clean_failure(result, out, "No space left on device")
