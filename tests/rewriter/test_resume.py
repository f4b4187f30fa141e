"""Resume: a rewrite killed (SIGKILL) at any point and run again with the same command ends
byte-identical to an uninterrupted run; a changed command is refused, or restarted with --restart."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, file_bytes

from dern_stream.cli import main

# A real process, killed with SIGKILL by itself at a chosen point: the hook lives here, not in the
# library. argv: kill point, N, then the dern-stream arguments.
_KILLED_RUN = r"""
import os, signal, sys
from dern_stream.checkpoint import progress, writer
from dern_stream.cli import main

point, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
seen = {"add": 0, "copy": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

original_add, original_copy = progress.Progress.add, writer.ShardedWriter.copy_raw
original_finish = writer.ShardedWriter.finish

def add(self, layer, record):
    seen["add"] += 1
    if point == "before-journal" and seen["add"] == n:
        die()  # layer n is written and flushed, but not journaled: it must be redone
    original_add(self, layer, record)
    if point == "after-journal" and seen["add"] == n:
        die()

def copy_raw(self, name, src):
    seen["copy"] += 1
    if point == "mid-layer" and seen["copy"] == n:
        die()  # in the middle of a layer's copies
    original_copy(self, name, src)

def finish(self):
    if point == "before-finish":
        die()  # every layer journaled, no index or config yet
    original_finish(self)

progress.Progress.add, writer.ShardedWriter.copy_raw, writer.ShardedWriter.finish = add, copy_raw, finish
main(args)
"""


def killed_run(point: str, n: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILLED_RUN, point, str(n), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def reference(build, tmp_path_factory):
    """An uninterrupted run, sharded so a layer's tensors spread over several files."""
    built = build("qwen3_moe")
    out = tmp_path_factory.mktemp("ref") / "out"
    args = ["--experts", 5, "--calib", built.calib, "--alpha", 0.2, "--max-shard-size", "120KB", "-q"]
    result = run("rewrite", built.model_dir, out, *args)
    assert result.exit_code == 0, result.output
    return built, args, file_bytes(out)


@pytest.mark.parametrize(("point", "n"), [("mid-layer", 2), ("mid-layer", 9), ("before-journal", 1),
                                          ("after-journal", 1), ("before-journal", 3), ("before-finish", 0)])
def test_killed_run_resumes_to_identical_bytes(point, n, reference, tmp_path, caplog):
    built, args, expected = reference
    out = tmp_path / "out"
    killed = killed_run(point, n, "rewrite", built.model_dir, out, *args)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    partial = tmp_path / ".out.dern-partial"
    journal = json.loads((partial / ".dern-progress.json").read_text()) if partial.exists() else {"layers": {}}

    result = run("rewrite", built.model_dir, out, *args)
    assert result.exit_code == 0, result.output
    if journal["layers"]:
        assert f"resuming {partial}: {len(journal['layers'])} of 3 MoE layers already done" in caplog.text
    assert file_bytes(out) == expected
    assert not partial.exists()


def test_changed_command_is_refused_then_restarted(reference, tmp_path, caplog):
    built, args, expected = reference
    out = tmp_path / "out"
    assert killed_run("after-journal", 1, "rewrite", built.model_dir, out, *args).returncode == -9
    before = file_bytes(tmp_path / ".out.dern-partial")

    changed = [*args[:-1], "--alpha", 0.3, "-q"]
    result = run("rewrite", built.model_dir, out, *changed)
    assert_clean_failure(result, out, "holds an interrupted rewrite with 1 layers done, started with different "
                                      "options or inputs (options.alpha: 0.2 -> 0.3); run its command again to "
                                      "resume it, or pass --restart to discard it")
    assert file_bytes(tmp_path / ".out.dern-partial") == before  # refused: the partial output is untouched

    result = run("rewrite", built.model_dir, out, *args, "--restart")
    assert result.exit_code == 0, result.output
    assert "resuming" not in caplog.text and file_bytes(out) == expected


def test_resume_with_another_thread_count_is_refused(reference, tmp_path):
    """CPU kernels split their sums by torch's thread count: layers computed with another count could differ in
    the last bits from the ones already written, so the run key holds it."""
    built, args, _ = reference
    out = tmp_path / "out"
    threads = torch.get_num_threads()  # the killed run's count too: a fresh process on this machine
    assert killed_run("after-journal", 1, "rewrite", built.model_dir, out, *args).returncode == -9
    torch.set_num_threads(threads + 1)
    try:
        result = run("rewrite", built.model_dir, out, *args)
    finally:
        torch.set_num_threads(threads)
    assert_clean_failure(result, out, f"different options or inputs (threads: {threads} -> {threads + 1})")


def test_changed_input_is_refused(reference, tmp_path):
    built, args, _ = reference
    out = tmp_path / "out"
    calib = tmp_path / "calib.zarr"
    subprocess.run(["cp", "-r", str(built.calib), str(calib)], check=True)
    args = [a if a != built.calib else calib for a in args]
    assert killed_run("after-journal", 1, "rewrite", built.model_dir, out, *args).returncode == -9
    marker = next(p for p in sorted(calib.rglob("*")) if p.is_file())
    os.utime(marker, ns=(0, 0))  # the dump was replaced (same name, new file)
    assert_clean_failure(run("rewrite", built.model_dir, out, *args), out,
                         "started with different options or inputs (calibration)")


def test_second_run_into_the_same_output_is_locked_out(reference, tmp_path):
    built, args, _ = reference
    out = tmp_path / "out"
    partial = tmp_path / ".out.dern-partial"
    partial.mkdir()
    held = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running rewrite holds: a lock on the directory itself
        result = run("rewrite", built.model_dir, out, *args)
    finally:
        os.close(held)
    assert result.exit_code == 2 and "another dern-stream rewrite is writing" in result.stderr
    assert not out.exists()


def test_damaged_partial_shard_is_refused(reference, tmp_path):
    built, args, expected = reference
    out = tmp_path / "out"
    assert killed_run("after-journal", 2, "rewrite", built.model_dir, out, *args).returncode == -9
    shard = next((tmp_path / ".out.dern-partial").glob("model-*.safetensors"))
    with open(shard, "ab") as f:
        f.write(b"\0")
    result = run("rewrite", built.model_dir, out, *args)
    assert_clean_failure(result, out, f"cannot resume: partial shard {shard.name} is not laid out as this run "
                                      "plans; pass --restart to start over")
    assert run("rewrite", built.model_dir, out, *args, "--restart").exit_code == 0
    assert file_bytes(out) == expected


def test_partial_files_are_not_copied_as_side_files(reference, tmp_path):
    """The journal and lock are dot-files of the staging directory: none reaches OUT."""
    _, _, expected = reference
    assert not [name for name in expected if Path(name).name.startswith(".dern")]


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "cpu"])
def test_cuda_computes_with_deterministic_kernels_and_restores_the_setting(device, monkeypatch):
    """(No GPU needed: the setting is torch's flag.) On CUDA, index_add_ would otherwise add with atomics in any
    order, and a resumed run would differ in the last bits from the layers already written."""
    from dern_stream.runtime.device import deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(torch.device(device)):
        on = torch.are_deterministic_algorithms_enabled()
        workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assert (on, workspace) == ((True, ":4096:8") if device != "cpu" else (False, None))
    assert not torch.are_deterministic_algorithms_enabled()
