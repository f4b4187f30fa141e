"""Data safety: no command ever writes onto, into or around what it reads, `--overwrite` replaces only
the command's own earlier output, and a run that stops (refused, SIGTERM, a full disk, NaN in the
input, too few file descriptors, a second process) loses nothing of the user's.

Each test builds its own world in tmp_path: a copy of a tiny real checkpoint (with its tokenizer), its
calibration dump and a text, plus whatever folders of the user's the case needs. A refusal must end
with exit status 2, exactly one `error:` line naming the problem, no traceback, and every file under
tmp_path byte-identical, none added or removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, file_bytes, read_tensors
from safetensors.torch import save_file

from dern_stream.calib import CalibWriter
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.runtime.locks import DirLock

CLI = [sys.executable, "-m", "dern_stream.cli"]
DUMP_OPTIONS = ("--num-tokens", 256, "--seq-len", 32, "-q")  # 8 sequences: a dump takes well under a second


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and link under `root`, by relative path: 'untouched' means equal."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "folder"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def without(snapshot: dict[str, str], *names: str) -> dict[str, str]:
    """`snapshot` less the entries at or under the top-level `names` (a command's own outputs)."""
    return {k: v for k, v in snapshot.items() if k.split(os.sep)[0] not in names}


def error_line(code: int, stderr: str, output: str, message: str) -> str:
    """Checks of a refusal common to in-process and subprocess runs; returns the error line."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: ") and message in lines[-1], (code, stderr)
    assert "Traceback" not in output + stderr
    return lines[-1]


def assert_refused(result, message: str, root: Path, before: dict[str, str]) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    error_line(result.exit_code, result.stderr, result.output, message)
    after = digest(root)
    assert sorted(set(after) - set(before)) == [], "files added"
    assert sorted(set(before) - set(after)) == [], "files removed"
    assert {k for k in before if before[k] != after[k]} == set(), "files changed"


@dataclass
class World:
    root: Path
    model: Path  # a copy of the tiny checkpoint (with its tokenizer)
    calib: Path  # a copy of its calibration dump (made by dump_from_model: no lock file)
    text: Path

    def dump(self, out, *extra) -> list:
        return ["dump", self.model, out, "--text", self.text, *DUMP_OPTIONS, *extra]

    def rewrite(self, out, *extra, calib=None) -> list:
        return ["rewrite", self.model, out, "--experts", 4, "--calib", calib or self.calib, "--alpha", 0.2, "-q",
                *extra]

    def eval(self, report, *extra) -> list:
        return ["eval", self.model, "--text", self.text, "--num-tokens", 256, "--seq-len", 32, "--json", report,
                "-q", *extra]

    def made(self, args) -> None:
        """Run a command that must succeed (an earlier output of the user's)."""
        result = run(*args)
        assert result.exit_code == 0, result.output


@pytest.fixture
def world(build, tmp_path) -> World:
    built = build("mixtral")
    w = World(tmp_path, tmp_path / "model", tmp_path / "calib.zarr", tmp_path / "corpus.txt")
    shutil.copytree(built.model_dir, w.model)
    shutil.copytree(built.calib, w.calib)
    shutil.copy2(built.model_dir.parent / "corpus.txt", w.text)
    return w


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("user data")
    (path / "sub").mkdir()
    (path / "sub" / "photo.bin").write_bytes(bytes(range(256)))
    return path


def user_file(path: Path) -> Path:
    path.write_text('{"mine": true}\n')
    return path


def tokenizer_folder(w: World) -> list:
    tok = w.root / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(w.model / name, tok / name)
    return w.dump(tok, "--tokenizer", tok, "--overwrite")


def dump_with_a_user_file(w: World) -> list:
    (w.calib / "notes.txt").write_text("my notes on this dump")
    return w.dump(w.calib, "--overwrite")


def complete_dump(w: World) -> list:
    w.made(w.dump(w.root / "d.zarr"))
    return w.dump(w.root / "d.zarr")


def rewrite_into_output_holding_the_dump(w: World) -> list:
    work = w.root / "work"
    w.made(w.rewrite(work))
    shutil.copytree(w.calib, work / "calib.zarr")
    return w.rewrite(work, "--overwrite", calib=work / "calib.zarr")


def rewrite_onto_output_with_a_user_file(w: World) -> list:
    out = w.root / "out"
    w.made(w.rewrite(out))
    (out / "notes.txt").write_text("what I learned from this model")
    return w.rewrite(out, "--overwrite")


def folder_with_a_foreign_record(w: World) -> list:
    """A model folder of the user's that happens to hold a dern_stream.json of its own."""
    mine = w.root / "finetune"
    shutil.copytree(w.model, mine)
    (mine / "dern_stream.json").write_text('{"experiment": "mine"}')
    (mine / "train_log.txt").write_text("loss 0.1")
    return w.rewrite(mine, "--overwrite")


def dump_with_a_user_file_inside(w: World) -> list:
    dump = w.root / "d.zarr"
    w.made(w.dump(dump))
    (dump / "moe_inputs" / "notes.txt").write_text("mine")
    return w.dump(dump, "--overwrite")


def staging_path_is_a_link_to_in(w: World) -> list:
    (w.root / ".out.dern-partial").symlink_to(w.model)
    return w.rewrite(w.root / "out")


def staging_path_holds_user_files(w: World) -> list:
    user_folder(w.root / ".out.dern-partial")
    return w.rewrite(w.root / "out")


def in_links_into_the_output(w: World) -> list:
    """IN assembled from links into an earlier output: replacing that output would change IN."""
    out, linked = w.root / "out", w.root / "linked"
    w.made(w.rewrite(out, "--experts", 8))
    linked.mkdir()
    for f in out.iterdir():
        (linked / f.name).symlink_to(f)
    return ["rewrite", linked, out, "--experts", 4, "--importance", "router-norm", "-q", "--overwrite"]


def eval_onto_an_earlier_report(w: World) -> list:
    w.made(w.eval(w.root / "eval.json"))
    return w.eval(w.root / "eval.json")


CASES = {
    # name: (make the world's extra state, returning the command line; the message its error line holds)
    "dump into the folder holding IN and the text": (
        lambda w: w.dump(w.root, "--overwrite"), "contains the input checkpoint"),
    "dump onto the text": (lambda w: w.dump(w.text, "--overwrite"), "is the text; choose another path"),
    "dump inside IN": (lambda w: w.dump(w.model / "calib.zarr", "--overwrite"), "lies inside the input checkpoint"),
    "dump onto the --tokenizer folder": (tokenizer_folder, "is the tokenizer; choose another path"),
    "dump onto a user folder": (lambda w: w.dump(user_folder(w.root / "mine"), "--overwrite"),
                                "exists and is not a calibration dump"),
    "dump onto a regular file": (lambda w: w.dump(user_file(w.root / "d.zarr"), "--overwrite"),
                                 "exists and is not a directory"),
    "dump onto a dump holding a user file": (dump_with_a_user_file, "holds notes.txt, which a dump never writes"),
    "dump onto a dump with a user file in a subfolder": (dump_with_a_user_file_inside,
                                                          "holds moe_inputs/notes.txt, which a dump never writes"),
    "rewrite onto a folder holding a foreign dern_stream.json": (
        folder_with_a_foreign_record, "holds no dern_stream.json that lists the files a rewrite wrote"),
    "rewrite with the staging path a link to IN": (staging_path_is_a_link_to_in,
                                                   "exists and is not a folder of its own"),
    "rewrite with user files at the staging path": (staging_path_holds_user_files,
                                                    "holds files but no dern-stream journal"),
    "rewrite --overwrite of an output that IN links into": (in_links_into_the_output,
                                                            "contains the input checkpoint's"),
    "dump onto a complete dump": (complete_dump, "already exists and is complete; pass --overwrite"),
    "dump onto a dump without a lock file": (lambda w: w.dump(w.calib), "pass --overwrite to start again"),
    "rewrite into an earlier output holding the dump": (rewrite_into_output_holding_the_dump,
                                                        "contains the calibration dump"),
    "rewrite onto the dump": (lambda w: w.rewrite(w.calib, "--overwrite"), "is the calibration dump; choose another"),
    "rewrite inside the dump": (lambda w: w.rewrite(w.calib / "out", "--overwrite"),
                                "lies inside the calibration dump"),
    "rewrite onto a user folder": (lambda w: w.rewrite(user_folder(w.root / "mine"), "--overwrite"),
                                   "holds no dern_stream.json that lists the files a rewrite wrote"),
    "rewrite onto an earlier output with a user file": (
        rewrite_onto_output_with_a_user_file, "holds notes.txt, which the earlier rewrite did not write"),
    "eval --json onto the text": (lambda w: w.eval(w.text), "is the text; choose another path"),
    "eval --json inside CKPT": (lambda w: w.eval(w.model / "eval.json"), "lies inside the checkpoint"),
    "eval --json onto a user file": (lambda w: w.eval(user_file(w.root / "eval.json")),
                                     "exists; pass --overwrite to replace it"),
    "eval --json onto a user file, --overwrite": (lambda w: w.eval(user_file(w.root / "eval.json"), "--overwrite"),
                                                  "is not a report that dern-stream eval wrote"),
    "eval --json onto an earlier report": (eval_onto_an_earlier_report, "exists; pass --overwrite to replace it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_and_nothing_touched(case, world):
    setup, message = CASES[case]
    args = setup(world)
    before = digest(world.root)
    assert_refused(run(*args), message, world.root, before)


# --- what --overwrite does replace -------------------------------------------------------------------

def test_eval_json_is_written_and_an_earlier_report_replaced(world):
    report = world.root / "eval.json"
    inputs = digest(world.root)
    world.made(world.eval(report, "--num-tokens", 128))
    first = json.loads(report.read_text())
    assert first["format"] == "dern-stream-eval" and first["tokens"] > 0

    world.made(world.eval(report, "--overwrite"))  # 256 tokens this time
    second = json.loads(report.read_text())
    assert second["format"] == "dern-stream-eval" and second["tokens"] > first["tokens"]
    assert digest(world.root) == {**inputs, "eval.json": hashlib.sha256(report.read_bytes()).hexdigest()}


def test_rewrite_overwrite_replaces_an_earlier_output(world):
    out, fresh = world.root / "out", world.root / "fresh" / "out"
    before = digest(world.root)
    world.made(world.rewrite(out, "--experts", 6))  # an earlier rewrite, with other options
    world.made(world.rewrite(out, "--overwrite"))
    world.made(world.rewrite(fresh))
    assert file_bytes(out) == file_bytes(fresh)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    assert sorted(p.name for p in world.root.iterdir()) == ["calib.zarr", "corpus.txt", "fresh", "model", "out"]
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["out"]
    assert without(digest(world.root), "out", "fresh") == before


def test_rewrite_overwrite_keeps_an_edit_of_yours_in_an_earlier_output(world):
    """An earlier output whose model card (or config, or any file the rewrite recorded) was edited since holds
    something of yours: --overwrite refuses it, as `card` refuses to write over such a card."""
    out = world.root / "out"
    world.made(world.rewrite(out, "--experts", 6))
    card = out / "README.md"
    card.write_text(card.read_text() + "\nMy notes on this model.\n")
    before = digest(world.root)
    result = run(*world.rewrite(out, "--overwrite"))
    assert_refused(result, "holds README.md, changed since the rewrite wrote it (an edit of yours is kept: move it "
                           "away)", world.root, before)
    assert card.read_text().endswith("My notes on this model.\n")


def test_dump_overwrite_replaces_an_earlier_dump(world):
    dump, fresh = world.root / "d.zarr", world.root / "fresh.zarr"
    before = digest(world.root)
    world.made(world.dump(dump, "--num-tokens", 512))  # an earlier, larger dump: none of it may survive
    world.made(world.dump(dump, "--overwrite"))
    world.made(world.dump(fresh))
    assert file_bytes(dump) == file_bytes(fresh)
    assert without(digest(world.root), "d.zarr", "fresh.zarr") == before


# --- locks ---------------------------------------------------------------------------------------------

def test_dump_overwrite_is_refused_while_a_rewrite_reads_the_dump(world):
    dump = world.root / "d.zarr"
    world.made(world.dump(dump))
    before = digest(world.root)
    with DirLock(dump, "busy", shared=True):  # what a rewrite (or eval) reading the dump holds
        result = run(*world.dump(dump, "--overwrite"))
    assert_refused(result, "is in use by another dern-stream process", world.root, before)


def test_dump_overwrite_is_refused_while_a_rewrite_reads_a_dump_without_a_lock_file(world):
    before = digest(world.root)
    with DirLock(world.calib, "busy", shared=True):  # exactly what rewrite --calib takes on this dump
        result = run(*world.dump(world.calib, "--overwrite"))
    assert_refused(result, "is in use by another dern-stream process", world.root, before)


def test_rewrite_is_refused_while_a_dump_is_written(world):
    dump = world.root / "d.zarr"
    world.made(world.dump(dump))
    before = digest(world.root)
    with DirLock(dump, "busy"):  # what a running dump holds
        result = run(*world.rewrite(world.root / "out", calib=dump))
    assert_refused(result, "is being written by a dern-stream dump right now", world.root, before)


@pytest.mark.slow  # (the default run's time: README, set-up)
def test_two_dumps_into_the_same_new_dump(world):
    """Two real processes race for one new DUMP: one makes it, the other is refused, whatever the timing,
    and the dump is exactly the one a process alone makes."""
    dump, alone = world.root / "d.zarr", world.root / "alone.zarr"
    args = [str(a) for a in world.dump(dump)]
    procs = [subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            done.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    assert sorted(code for code, _, _ in done) == [0, 2], done
    code, out, err = next(d for d in done if d[0] == 2)
    line = error_line(code, err, out, "")
    assert "is in use by another dern-stream process" in line or "already exists and is complete" in line, line

    world.made(world.dump(alone))
    assert file_bytes(dump) == file_bytes(alone)
    assert sorted(p.name for p in world.root.iterdir()) == ["alone.zarr", "calib.zarr", "corpus.txt", "d.zarr",
                                                            "model"]
    world.made(world.rewrite(world.root / "out", calib=dump))


def test_a_dump_finished_meanwhile_is_not_replaced_without_overwrite(world, monkeypatch):
    """Process A checks that DUMP is new and tokenizes its text; meanwhile process B (another command)
    makes DUMP, complete. A, started without --overwrite, must then refuse, not replace B's dump."""
    from dern_stream.calib import dump as dump_pipeline

    dump, real, seen = world.root / "d.zarr", dump_pipeline._request_tokens, {}

    def tokenize_while_another_dump_finishes(ckpt, request):
        ids = real(ckpt, request)
        if not seen:
            seen["other"] = True
            dump_pipeline.dump(world.model, dump, text=world.text, num_tokens=512, seq_len=32, progress=False)
            seen["before"] = digest(world.root)
        return ids

    monkeypatch.setattr(dump_pipeline, "_request_tokens", tokenize_while_another_dump_finishes)
    result = run(*world.dump(dump))
    assert_refused(result, "already exists and is complete", world.root, seen["before"])


# --- interruptions -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_layers(build, tmp_path_factory):
    """24 MoE layers, sharded into 75 input files, and the same weights in one file (same dump)."""
    built = build("mixtral", num_hidden_layers=24, max_shard_size="100KB")
    single = tmp_path_factory.mktemp("single") / "model"
    single.mkdir()
    save_file(read_tensors(built.model_dir), single / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(built.model_dir / "config.json", single)
    return built, single


def journaled_layers(partial: Path) -> int:
    try:
        return len(json.loads((partial / ".dern-progress.json").read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_a_layer(proc: subprocess.Popen, partial: Path) -> int:
    """Poll until the journal lists a finished layer (the process must still be running)."""
    deadline = time.monotonic() + 240
    while not journaled_layers(partial):
        assert proc.poll() is None, ("finished before a layer was journaled", proc.returncode,
                                     proc.communicate())
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return journaled_layers(partial)


def test_sigterm_keeps_finished_layers_and_the_same_command_resumes(many_layers, tmp_path):
    built, _ = many_layers
    out, ref = tmp_path / "out", tmp_path / "ref" / "out"
    args = ["rewrite", built.model_dir, out, "--experts", 4, "--calib", built.calib, "--alpha", 0.2,
            "--max-shard-size", "100KB", "-q"]
    inputs = {p: digest(p) for p in (built.model_dir, built.calib)}
    partial = tmp_path / ".out.dern-partial"
    with subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_for_a_layer(proc, partial)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()  # (a no-op once it has exited)

    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted") and "finished layers are kept" in last, err
    assert "again to resume" in last and "Traceback" not in err
    assert not out.exists() and not (partial / "config.json").exists()
    assert 1 <= journaled_layers(partial) < 24

    result = run(*args)
    assert result.exit_code == 0, result.output
    assert not partial.exists()
    result = run(*[ref if a == out else a for a in args])
    assert result.exit_code == 0, result.output
    assert file_bytes(out) == file_bytes(ref)  # every file, dern_stream.json included
    assert {p: digest(p) for p in inputs} == inputs


# A real process under a low RLIMIT_NOFILE. Its flushes are made to take 5 ms each (a network or
# spinning disk): the writer then runs ahead of its flush thread, deterministically, as it does now and
# then on a fast disk. argv: limit, then the dern-stream arguments.
_LIMITED_RUN = r"""
import os, resource, sys, time
limit, args = int(sys.argv[1]), sys.argv[2:]
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
real_fsync = os.fsync

def slow_fsync(fd):
    time.sleep(0.005)
    real_fsync(fd)

os.fsync = slow_fsync
from dern_stream.cli import main
main(args)
"""
OPEN_FILES = 48


def limited(*args) -> list[str]:
    return [sys.executable, "-c", _LIMITED_RUN, str(OPEN_FILES), *map(str, args)]


def many_shards_args(src: Path, calib: Path, out: Path) -> list:
    # On the CPU: CUDA alone needs more file descriptors than the limit (it is the shards that are under test).
    return ["rewrite", src, out, "--experts", 4, "--calib", calib, "--alpha", 0.2, "--max-shard-size", "5KB", "-q",
            "--device", "cpu"]


@pytest.mark.slow  # (the default run's time: README, set-up)
@pytest.mark.parametrize("source", ["one file", "75 shards"])
def test_hundreds_of_output_shards_under_a_low_open_file_limit(source, many_layers, tmp_path):
    built, single = many_layers
    src = built.model_dir if source == "75 shards" else single
    out = tmp_path / "out"
    done = subprocess.run(limited(*many_shards_args(src, built.calib, out)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 300
    result = run("verify", out, "--against", src)
    assert result.exit_code == 0, result.output


@pytest.mark.slow  # (the default run's time: README, set-up)
def test_killed_many_shard_run_resumes_under_a_low_open_file_limit(many_layers, tmp_path):
    built, single = many_layers
    out, ref = tmp_path / "out", tmp_path / "ref" / "out"
    result = run(*many_shards_args(single, built.calib, ref))  # uninterrupted, no limit
    assert result.exit_code == 0, result.output

    with subprocess.Popen(limited(*many_shards_args(single, built.calib, out)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_for_a_layer(proc, tmp_path / ".out.dern-partial")
        finally:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    done = subprocess.run(limited(*many_shards_args(single, built.calib, out)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert file_bytes(out) == file_bytes(ref)


# --- bad values, places and disks ------------------------------------------------------------------------

def poke(src: Path, name: str, value: float) -> None:
    """Overwrite the first element of float32 tensor `name` in place, at its offset in its shard."""
    entry = Checkpoint(src).entries[name]
    assert entry.dtype == "F32"
    with open(entry.file, "r+b") as f:
        f.seek(entry.start)
        f.write(struct.pack("<f", value))


def outputs_config_files(w: World) -> list[Path]:
    return [p for p in w.root.rglob("config.json") if w.model not in p.parents]


def test_nan_in_a_copied_tensor_is_never_written(world):
    name = "model.layers.0.self_attn.q_proj.weight"
    poke(world.model, name, float("nan"))
    before, out = digest(world.root), world.root / "out"
    result = run(*world.rewrite(out))
    assert_clean_failure(result, out, f"tensor {name} holds NaN or Inf values in the input")
    assert "the input weights are not finite" in result.stderr
    assert not outputs_config_files(world)
    assert digest(world.root) == before


def test_inf_in_an_input_expert_stops_at_that_layer_and_keeps_nothing(world):
    """Found at layer 1, after layer 0 was written: nothing is kept, since resuming would meet the same
    values (the input must change, and a changed input starts over), and the message does not offer it."""
    for e in range(8):
        poke(world.model, f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight", float("inf"))
    before, out = digest(world.root), world.root / "out"
    result = run(*world.rewrite(out))
    assert_clean_failure(result, out, "NaN or Inf")
    line = result.stderr.strip().splitlines()[-1]
    assert "tensor model.layers.1." in line and "input" in line and "resume" not in line, line
    assert not (world.root / ".out.dern-partial").exists()
    assert not outputs_config_files(world)
    assert digest(world.root) == before


def empty_writable_mount_point() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        path = Path(fields[1].replace("\\040", " "))
        if "ro" in fields[3].split(",") or path == Path("/"):
            continue
        try:
            if path.is_dir() and os.path.ismount(path) and os.access(path, os.W_OK) and not any(path.iterdir()):
                return path
        except OSError:
            continue
    return None


@contextmanager
def mount_point(directory: Path) -> Iterator[Path | None]:
    """An empty, writable mount point: a small tmpfs mounted on `directory` where this process may mount (as root),
    else one this machine has; None where there is neither (the test then skips: it cannot make one)."""
    if os.geteuid() == 0 and shutil.which("mount") and shutil.which("umount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "dern-test", str(directory)],
                                 capture_output=True)
        if mounted.returncode == 0:
            try:
                yield directory
            finally:
                subprocess.run(["umount", "-l", str(directory)], capture_output=True)
            return
    yield empty_writable_mount_point()


def test_a_mount_point_is_refused_as_out(world, tmp_path_factory):
    """OUT on a mount point cannot be replaced by the final rename: refused before any work, nothing written."""
    with mount_point(tmp_path_factory.mktemp("mount")) as mount:
        if mount is None:
            pytest.skip("not root (or mount refused), and no empty, writable mount point in /proc/self/mounts")
        assert os.path.ismount(mount)
        before = digest(world.root)
        beside = set(os.listdir(mount.parent))
        try:
            result = run(*world.rewrite(mount))
            assert_refused(result, "is a mount point", world.root, before)
            assert not any(mount.iterdir())
            assert set(os.listdir(mount.parent)) == beside
        finally:  # a regression must not leave its staging directory beside the mount point
            partial = mount.parent / f".{mount.name}.dern-partial"
            if partial.name not in beside and partial.is_dir():
                shutil.rmtree(partial)


def test_full_disk_in_dump_then_the_same_command_resumes(world, monkeypatch, caplog):
    dump, alone = world.root / "d.zarr", world.root / "alone.zarr"
    args = world.dump(dump, "--batch-size", 4)  # 8 sequences: two appends per MoE layer
    before = digest(world.root)
    real, calls = CalibWriter.append, []

    def full_after_three(self, layer, hidden, router_sha256=None):
        calls.append(layer)
        if len(calls) > 3:  # the second batch of MoE layer 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "moe_inputs" / str(layer)))
        return real(self, layer, hidden, router_sha256)

    monkeypatch.setattr(CalibWriter, "append", full_after_three)
    result = run(*args)
    assert result.exit_code == 2, result.output
    line = error_line(result.exit_code, result.stderr, result.output, "No space left on device")
    assert str(dump / "moe_inputs" / "1") in line and "run the same command again to resume" in line

    monkeypatch.setattr(CalibWriter, "append", real)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "after decoder layer 0" in caplog.text
    world.made(world.dump(alone, "--batch-size", 4))
    assert file_bytes(dump) == file_bytes(alone)
    assert without(digest(world.root), "d.zarr", "alone.zarr") == before


def test_device_out_of_memory_mid_run_is_one_line_and_the_same_command_resumes(world, monkeypatch):
    """torch's OutOfMemoryError from a layer's computation (what a GPU too small for a layer raises) ends in one
    line that says how to go on; the finished layers are kept and the same command completes the output."""
    from dern_stream.experts import recombine

    out, whole = world.root / "out", world.root / "whole"
    real, calls = recombine.dern_layer, []

    def out_of_memory_in_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 23.5 GiB of which 1.2 GiB is free.")
        return real(*args, **kwargs)

    monkeypatch.setattr(recombine, "dern_layer", out_of_memory_in_the_second_layer)
    result = run(*world.rewrite(out))
    assert result.exit_code == 2, result.output
    line = error_line(result.exit_code, result.stderr, result.output, "error: the device ran out of memory (CUDA "
                      "out of memory. Tried to allocate 2.00 GiB); finished layers are kept: free the GPU's memory and "
                      "run the same command again to resume, or start over on the CPU with --device cpu --restart")
    assert line and not out.exists() and (world.root / ".out.dern-partial").is_dir()

    monkeypatch.setattr(recombine, "dern_layer", real)
    assert run(*world.rewrite(out)).exit_code == 0
    world.made(world.rewrite(whole))
    assert file_bytes(out) == file_bytes(whole)


def test_a_folder_named_like_a_moved_aside_output_is_left_alone(world):
    mine = user_folder(world.root / ".out.dern-old-backup")
    before = digest(mine)
    world.made(world.rewrite(world.root / "out"))
    assert digest(mine) == before


def test_a_file_written_into_out_during_the_rewrite_is_not_replaced(world, monkeypatch):
    """OUT is checked again just before the finished output replaces it."""
    from dern_stream.checkpoint import output_dir

    out = world.root / "out"
    out.mkdir()
    real = output_dir.side_files

    def user_writes_meanwhile(src):
        (out / "thesis.txt").write_text("my thesis")
        return real(src)

    monkeypatch.setattr(output_dir, "side_files", user_writes_meanwhile)
    result = run(*world.rewrite(out))
    assert result.exit_code == 2 and "changed while the rewrite ran" in result.stderr, result.output
    assert (out / "thesis.txt").read_text() == "my thesis" and [p.name for p in out.iterdir()] == ["thesis.txt"]


def test_dump_of_a_model_with_non_finite_weights_is_refused(world):
    poke(world.model, "model.layers.0.self_attn.q_proj.weight", float("nan"))
    dump = world.root / "d.zarr"
    before = digest(world.root)
    result = run(*world.dump(dump))
    line = error_line(result.exit_code, result.stderr, result.output, "inputs came out NaN or Inf")
    assert "MoE layer 0" in line and "resume" not in line  # running it again would meet the same values
    assert without(digest(world.root), "d.zarr") == before


def test_eval_of_a_model_with_non_finite_weights_is_one_line(world):
    poke(world.model, "model.layers.0.self_attn.q_proj.weight", float("nan"))
    report = world.root / "eval.json"
    before = digest(world.root)
    result = run(*world.eval(report))
    error_line(result.exit_code, result.stderr, result.output, "next-token loss is not finite")
    assert digest(world.root) == before
