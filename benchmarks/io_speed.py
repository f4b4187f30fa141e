"""Rewrite speed against the floor: a plain copy of the checkpoint directory, in one run.

    python benchmarks/io_speed.py [--size 2GB] [--layers 24] [--checkpoint DIR --calib DUMP] [--repeat N] [--skip-dern]

Times, with the input's pages dropped from the page cache before each run (posix_fadvise
DONTNEED, so every run reads from disk), the rewrites each in a fresh process, and the jobs taking
turns so that the shared disk's slow spells fall on all of them alike:
  copy             shutil.copytree of the checkpoint directory
  copy + fsync     the same, then every file flushed to disk (the rewrite flushes its output too)
  pass-through     rewrite with K = N and alpha = 1 (nothing moves: every tensor is copied)
  dern 50%         rewrite to half the experts with the paper's DERN
and prints the ratios to the copy and each rewrite's busy time per stage (read, importance,
reassign, cluster, fit, write; the stages run on three threads and overlap). Rewrite times are those
of `dern_stream.rewrite` itself; the interpreter and torch import (printed) come on top for the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import parse_size, write_synthetic, write_synthetic_dump

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import dern_stream
t1 = time.perf_counter()
src, out, dump, experts, alpha = sys.argv[1:6]
s = dern_stream.rewrite(src, out, experts=int(experts), alpha=float(alpha), calib=dump, progress=False)
print(json.dumps({"import": t1 - t0, "seconds": time.perf_counter() - t1, "stages": s.stages,
                  "moved": s.segments_reassigned, "pooled": s.segments_pooled}))
"""


def drop_cache(*dirs: Path) -> None:
    """Evict the files' pages from the page cache (clean pages only: call after they are flushed)."""
    for d in dirs:
        for f in Path(d).rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def fsync_tree(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def timed_copy(src: Path, out: Path, sync: bool) -> float:
    drop_cache(src)
    t = time.perf_counter()
    shutil.copytree(src, out)
    if sync:
        fsync_tree(out)
    seconds = time.perf_counter() - t
    shutil.rmtree(out)
    return seconds


def timed_rewrite(src: Path, out: Path, dump: Path, experts: int, alpha: float) -> dict:
    drop_cache(src, dump)
    run = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), str(dump), str(experts), str(alpha)],
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"rewrite failed:\n{run.stderr}")
    shutil.rmtree(out)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GB", help="synthetic checkpoint size (ignored with --checkpoint)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--checkpoint", help="time this checkpoint instead (with --calib)")
    ap.add_argument("--calib", help="its calibration dump")
    ap.add_argument("--repeat", type=int, default=2, help="turns of the copies and the pass-through; "
                    "the fastest of each counts")
    ap.add_argument("--skip-dern", action="store_true", help="time only the copies and the pass-through")
    ap.add_argument("--workdir", default=".", help="where the synthetic checkpoint and outputs go")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        if a.checkpoint:
            src, dump = Path(a.checkpoint), Path(a.calib)
        else:
            src = write_synthetic(tmp / "in", size=parse_size(a.size), layers=a.layers, experts=a.experts,
                                  upcycled=0.3)
            dump = write_synthetic_dump(src, tmp / "calib.zarr")
        config = json.loads((src / "config.json").read_text())
        n = config.get("num_local_experts") or config.get("num_experts") or config["n_routed_experts"]
        total = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        print(f"checkpoint {src} ({total / 1e9:.2f} GB, {n} experts per layer), dump {dump}; "
              f"{os.cpu_count()} CPUs; fastest of {a.repeat} runs, input evicted from the page cache before each")
        # The jobs take turns, run after run, so a slow spell of the (shared) disk hits all of them alike
        # rather than whichever happened to run then; the fastest run of each counts.
        jobs = [("pass-through", n, 1.0)] + ([] if a.skip_dern else [("dern 50%", n // 2, 0.4)])
        copies, syncs, rewrites = [], [], {label: [] for label, _, _ in jobs}
        for turn in range(a.repeat):
            copies.append(timed_copy(src, tmp / "copy", sync=False))
            syncs.append(timed_copy(src, tmp / "copy", sync=True))
            for label, experts, alpha in jobs:
                if alpha == 1 or turn == 0:  # DERN is compute-bound: one run says enough
                    rewrites[label].append(timed_rewrite(src, tmp / "out", dump, experts, alpha))
        copy, copy_sync = min(copies), min(syncs)
        median_sync = statistics.median(syncs)
        print(f"copy:          {copy:7.2f} s  ({total / copy / 1e9:.2f} GB/s)   runs: {_runs(copies)}")
        print(f"copy + fsync:  {copy_sync:7.2f} s  ({total / copy_sync / 1e9:.2f} GB/s)   runs: {_runs(syncs)}")
        for label, runs in rewrites.items():
            r = min(runs, key=lambda r: r["seconds"])
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            print(f"{label + ':':14} {r['seconds']:7.2f} s  = {r['seconds'] / copy:.2f}x copy, "
                  f"{r['seconds'] / copy_sync:.2f}x copy + fsync (import {r['import']:.1f} s on top); "
                  f"segments moved {r['moved']}/{r['pooled']}   runs: {_runs([r['seconds'] for r in runs])}")
            print(f"{'':14} median of the runs: {statistics.median(r['seconds'] for r in runs) / median_sync:.2f}x "
                  "the median copy + fsync")
            print(f"{'':14} busy s by stage: {stages}")


def _runs(seconds: list[float]) -> str:
    return " ".join(f"{s:.2f}" for s in seconds) + f" (median {statistics.median(seconds):.2f})"


if __name__ == "__main__":
    main()
