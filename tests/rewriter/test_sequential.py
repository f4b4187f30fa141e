"""The sequential rewrite: each MoE layer fitted on the inputs the compressed model gives it, checked
against the rewritten model loaded whole in transformers; resumed after a kill to the same bytes; refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import cli_without, file_bytes, routed_error
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.errors import DernError
from dern_stream.stream.executor import moe_block_of

OPTIONS = dict(experts=4, refit=True, sequential=True, fit_tokens=10**6, progress=False)


def _block_inputs(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every MoE block's input [tokens, hidden] on `ids`, from transformers' own forward."""
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        block = moe_block_of(layer)
        if block is not None:
            hooks.append(block.register_forward_pre_hook(
                lambda _m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(("family", "target"), [("mixtral", "model"), ("qwen2_moe", "layer"),
                                                ("deepseek_v3", "model"), ("deepseek_v3", "layer")])
def test_each_layer_is_fitted_on_the_compressed_models_own_inputs(family, target, build, tmp_path):
    """Per MoE layer, the recorded fit error equals ||y_new(x_new) - y(r)|| / ||y(r)||, where x_new is that layer's
    input in the rewritten model (loaded whole in transformers), y the original block, and r = x_new (target
    "layer") or the dump's cached input of the same token (target "model"): so the rewrite ran the compressed layers
    in front of each layer, as the output has them. (Shared experts, which no method changes, cancel.)"""
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, calib=built.calib, sequential_target=target, **OPTIONS)
    layers = json.loads((out / "dern_stream.json").read_text())["layers"]
    dump = CalibDump(built.calib)
    ids = dump.tokens()
    rewritten = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32)
    inputs = _block_inputs(rewritten, ids)
    moved = []
    for i, x_new in inputs.items():
        x = torch.cat(list(dump.chunks(i)))
        fit = layers[str(i)]["output_error"]
        assert fit["fit_tokens"] == ids.numel()
        moved.append(float(torch.linalg.vector_norm(x_new - x) / torch.linalg.vector_norm(x)))
        reference = x if target == "model" else x_new
        assert fit["error"] == pytest.approx(routed_error(original, rewritten, i, reference, x_new), rel=1e-3,
                                             abs=1e-6)
    assert len(moved) > 1
    assert moved[0] < 1e-3  # the first MoE layer sees the original inputs (up to the dump's float16)
    assert all(m > 1e-3 for m in moved[1:])  # the others, what the compressed layers before them give


_RUN = "import sys; from dern_stream.cli import main; main(sys.argv[1:])"
_KILLED = r"""
import os, signal, sys
from dern_stream.checkpoint import progress
from dern_stream.cli import main

seen = [0]
original = progress.Progress.add

def add(self, layer, record):
    original(self, layer, record)
    seen[0] += 1
    if seen[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # this many layers journaled; the hidden states after them saved

progress.Progress.add = add
main(sys.argv[2:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("journaled", [1, 3])  # of 3 MoE layers: 3 = killed before the output was finished
def test_a_killed_sequential_rewrite_resumes_to_the_same_bytes(journaled, build, tmp_path):
    built = build("qwen3_moe")
    args = ["rewrite", str(built.model_dir), "OUT", "-k", "5", "--calib", str(built.calib), "--refit",
            "--sequential", "-q"]
    whole = tmp_path / "whole"
    done = subprocess.run([sys.executable, "-c", _RUN, *[a if a != "OUT" else str(whole) for a in args]],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(journaled), *[a if a != "OUT" else str(out)
                                                                               for a in args]],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".out.dern-partial"
    if journaled == 1:  # the hidden states after it are saved (the last layer's journal is written by the finish)
        assert sorted(p.name for p in (partial / ".sequential").iterdir())
    resumed = subprocess.run([sys.executable, "-c", _RUN, *[a if a != "OUT" else str(out) for a in args]],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert file_bytes(out) == file_bytes(whole)
    assert not partial.exists() and not (out / ".sequential").exists()


def test_sequential_refusals(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    with pytest.raises(DernError, match=r"sequential=True changes nothing without an option fitted"):
        dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, sequential=True, recipe="paper")
    with pytest.raises(DernError, match=r"fits the layers in order, in one process: leave out workers and ray"):
        dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, refit=True, sequential=True,
                            workers=2)
    with pytest.raises(DernError, match=r"holdout must be a finite number in \[0, 0.5\]"):
        dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, refit=True, holdout=0.9)
    assert not out.exists()


def test_without_transformers_the_sequential_rewrite_is_one_line(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    result = cli_without("transformers", "rewrite", built.model_dir, out, "-k", 4, "--calib", built.calib, "--refit",
                         "--sequential")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --sequential runs the model's forward and needs "
                                                  "transformers: pip install 'dern-stream[dump]'"]
    assert not out.exists()
