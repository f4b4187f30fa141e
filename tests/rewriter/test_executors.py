"""The same plan executed by local worker processes, or by Ray tasks, writes the same bytes as one process;
a worker that dies loses only its layer, which is run again; resume works across executors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import file_bytes

import dern_stream
from dern_stream.cli import main
from dern_stream.synthetic import write_synthetic, write_synthetic_dump

# A worker that SIGKILLs itself the first time it is given layer DERN_TEST_LAYER (the marker file makes it
# once): the hook lives in this script, which spawned workers import as their main module too.
_DYING_WORKER = r"""
import os, signal, sys
from pathlib import Path
import dern_stream.rewriter.executors as pools

original = pools.run_pickled

def run_pickled(plan, staged, index, threads):
    marker = Path(os.environ["DERN_TEST_MARKER"])
    if index == int(os.environ["DERN_TEST_LAYER"]) and not marker.exists():
        marker.write_text("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(plan, staged, index, threads)

pools.run_pickled = run_pickled  # what the driver submits: pickled by reference to this script's function

if __name__ == "__main__":
    from dern_stream.cli import main
    main(sys.argv[1:])
"""

# (one thread per layer: torch's sums can depend on the thread count, so runs compare at the same --threads)
ARGS = ["--experts", "4", "--alpha", "0.2", "--max-shard-size", "150KB", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def single(build, tmp_path_factory):
    """qwen3_moe rewritten by one process, sharded so layers share files."""
    built = build("qwen3_moe")
    out = tmp_path_factory.mktemp("single") / "out"
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(out), "--calib", str(built.calib), *ARGS])
    assert result.exit_code == 0, result.output
    return built, file_bytes(out)


def test_two_local_workers_write_the_same_bytes(single, tmp_path):
    built, expected = single
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(out), "--calib", str(built.calib),
                                       *ARGS, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert file_bytes(out) == expected


@pytest.mark.slow
def test_a_dead_worker_costs_only_its_layer(single, tmp_path):
    built, expected = single
    script, out, marker = tmp_path / "dying.py", tmp_path / "out", tmp_path / "died"
    script.write_text(_DYING_WORKER)
    env = {**os.environ, "DERN_TEST_MARKER": str(marker), "DERN_TEST_LAYER": "1"}
    run = subprocess.run([sys.executable, str(script), "rewrite", str(built.model_dir), str(out), "--calib",
                          str(built.calib), *ARGS, "--workers", "2"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert marker.exists()  # the worker did die
    assert file_bytes(out) == expected


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(single, tmp_path):
    """SIGKILL the driver of a two-worker run once a layer is journaled: its workers end with it, and one process
    finishes the job."""
    built, expected = single
    out = tmp_path / "out"
    partial = tmp_path / ".out.dern-partial" / ".dern-progress.json"
    cmd = [sys.executable, "-m", "dern_stream.cli", "rewrite", str(built.model_dir), str(out), "--calib",
           str(built.calib), *ARGS, "--workers", "2"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if partial.exists() and '"layers": {"' in partial.read_text():
            break
        time.sleep(0.05)
    workers = _children(driver.pid)
    os.kill(driver.pid, signal.SIGKILL)  # the driver alone: nothing can tell its workers to stop
    driver.wait()
    gone = time.monotonic() + 10
    while time.monotonic() < gone and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "the workers outlived their driver"
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(out), "--calib", str(built.calib), *ARGS])
    assert result.exit_code == 0, result.output
    assert file_bytes(out) == expected


@pytest.mark.slow
def test_ray_tasks_write_the_same_bytes(single, tmp_path):
    """A local Ray cluster of 2 CPU workers, one task per layer."""
    ray = pytest.importorskip("ray")
    built, expected = single
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dern_stream.rewrite(built.model_dir, tmp_path / "out", experts=4, calib=built.calib, alpha=0.2,
                            max_shard_size="150KB", ray="auto", threads=1, progress=False)
    finally:
        ray.shutdown()
    assert file_bytes(tmp_path / "out") == expected


def test_the_thread_count_is_a_recorded_setting(tmp_path):
    """torch's sums can depend on how many threads split them, so each layer's thread count is part of the run: the
    record names it, a resume must keep it, and one process and two workers with the same --threads write the same
    bytes (on layers wide enough for torch to use both threads)."""
    src = write_synthetic(tmp_path / "ck", layers=2, hidden=256, intermediate=512, experts=8, vocab=512)
    dump = write_synthetic_dump(src, tmp_path / "calib.zarr", tokens=1024)
    runs = {}
    for name, extra in (("one", ["--threads", "2"]), ("two", ["--threads", "2", "--workers", "2"]),
                        ("shared", ["--workers", "2"])):
        result = subprocess.run([sys.executable, "-m", "dern_stream.cli", "rewrite", str(src), str(tmp_path / name),
                                 "--experts", "4", "--calib", str(dump), "-q", *extra], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((tmp_path / name / "dern_stream.json").read_text())["reproduce"]["torch_threads"]
    # by default the cores are shared out among the workers
    assert runs == {"one": 2, "two": 2, "shared": max(1, torch.get_num_threads() // 2)}
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "two")


def test_ray_without_ray_installed_is_one_line(build, tmp_path, monkeypatch):
    built = build("mixtral")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(tmp_path / "out"), "-k", "4",
                                       "--calib", str(built.calib), "--ray", "auto"])
    assert result.exit_code == 2 and "pip install 'dern-stream[ray]'" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_bad_executor_options_are_one_line(build, tmp_path):
    built = build("mixtral")
    for extra, message in ((["--workers", "0"], "--workers must be an integer of at least 1"),
                           (["--workers", "2", "--ray", "auto"], "--workers and --ray do not go together")):
        result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(tmp_path / "out"), "-k", "4",
                                           "--calib", str(built.calib), *extra])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mixtral", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_a_dump_split_among_workers_is_the_same_dump(family, build, tmp_path):
    """Sequences split among 3 workers, in whole batches and whole chunks: every layer's inputs and
    every attribute as one process writes them."""
    import numpy as np
    import zarr

    from dern_stream.calib import CalibDump
    from dern_stream.tiny_models import calibration_tokens

    built = build(family)
    ids = calibration_tokens(sequences=11, length=8, seed=5)
    for workers in (1, 3):
        dern_stream.dump(built.model_dir, tmp_path / f"w{workers}.zarr", tokens=ids, batch_size=2, chunk_tokens=16,
                         workers=workers, progress=False)
    one, many = CalibDump(tmp_path / "w1.zarr"), CalibDump(tmp_path / "w3.zarr")
    assert many.attrs == one.attrs and many.attrs["complete"]
    for layer in one.attrs["moe_layers"]:
        a, b = one.layer(layer), many.layer(layer)
        assert dict(b.attrs) == dict(a.attrs) and b.shape == a.shape == (88, a.shape[1])
        assert np.array_equal(np.asarray(b[:]), np.asarray(a[:]))
    assert np.array_equal(zarr.open_group(str(tmp_path / "w3.zarr"))["tokens"][:], ids.numpy())


def test_split_sequences_in_whole_batches_and_chunks():
    from dern_stream.calib.dump_workers import split_sequences

    parts = split_sequences(sequences=11, seq_len=8, batch_size=2, chunk_tokens=16, workers=3)
    assert parts == [(0, 4), (4, 8), (8, 11)]
    for start, _ in parts:
        assert start % 2 == 0 and (start * 8) % 16 == 0
    assert split_sequences(3, 8, 4, 16, workers=4) == [(0, 3)]  # one batch: one worker


def test_a_layer_that_fails_in_a_worker_is_one_line_and_keeps_nothing(build, tmp_path):
    """Inf in a layer's input experts, found by a worker: one line, no output, nothing kept to resume, and
    the other worker stopped rather than waited for."""
    import shutil
    import struct

    from helpers import assert_clean_failure

    from dern_stream.checkpoint import Checkpoint

    src = tmp_path / "model"
    shutil.copytree(build("mixtral").model_dir, src)
    for e in range(8):
        entry = Checkpoint(src).entries[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"]
        with open(entry.file, "r+b") as f:
            f.seek(entry.start)
            f.write(struct.pack("<f", float("inf")))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-k", "4", "--importance", "router-norm",
                                       "--alpha", "0.2", "--workers", "2"])
    assert_clean_failure(result, out, "NaN or Inf")
    assert "model.layers.1." in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / ".out.dern-partial").exists()
