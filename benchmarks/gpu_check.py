"""The first thing to run on a machine with a GPU: dump and rewrite on CUDA, end to end, against the CPU.

    python benchmarks/gpu_check.py [--workdir DIR] [--layers 4] [--skip-tests]

On a synthetic upcycled checkpoint with 64 experts per layer (Mixtral layout, hidden 1024, 512 neurons
per expert), in this order:
  1. `dump` of 8192 random tokens on CUDA and on the CPU: time, and how far apart the cached inputs are;
  2. `rewrite` 64 -> 32 experts (the default setting: DERN with the down refit) on CUDA and on the CPU, from
     the CUDA dump: wall time, busy seconds per stage, peak device memory, and agreement (the kept experts,
     and the relative difference of every output tensor);
  3. `rewrite --recipe paper`, the default and `--recipe best` (gradient steps included) on CUDA: wall time
     against the paper's DERN, and peak device memory against the plan's estimate;
  4. `pytest tests/test_cuda.py` (the CUDA tests that are skipped on machines without a GPU);
  5. with `--suite`, the whole default test suite, which computes on CUDA where it is present (`--device auto`).
Sized to finish in a few minutes on one GPU and a 16-core host. `--device cpu` runs the same steps with
the CPU on both sides (to check the script itself where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.synthetic import write_synthetic


def dump_both(src: Path, tmp: Path, device: str, tokens: int) -> Path:
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (tokens // 512, 512), generator=torch.Generator().manual_seed(0))
    seconds = {}
    # Untimed first: the device's first dump pays for CUDA's start and kernel loading (8.2 s against 2.1 s on an H200).
    dern_stream.dump(src, tmp / "dump-warm.zarr", tokens=ids[:1], batch_size=1, device=device, progress=False)
    for label, where in (("dev", device), ("ref", "cpu")):
        start = time.perf_counter()
        dern_stream.dump(src, tmp / f"dump-{label}.zarr", tokens=ids, batch_size=4, device=where, progress=False)
        seconds[label] = time.perf_counter() - start
    a, b = CalibDump(tmp / "dump-dev.zarr"), CalibDump(tmp / "dump-ref.zarr")
    worst = 0.0
    for layer in a.attrs["moe_layers"]:
        x, y = np.asarray(a.layer(layer)[:], dtype=np.float32), np.asarray(b.layer(layer)[:], dtype=np.float32)
        worst = max(worst, float(np.linalg.norm(x - y) / np.linalg.norm(y)))
    print(f"dump of {tokens} tokens: {device} {seconds['dev']:.1f} s, cpu {seconds['ref']:.1f} s; "
          f"largest relative difference of a layer's cached inputs: {worst:.2e}")
    return tmp / "dump-dev.zarr"


def rewrite_both(src: Path, dump: Path, tmp: Path, device: str) -> None:
    results = {}
    for label, where in (("dev", device), ("ref", "cpu")):
        if where.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = dern_stream.rewrite(src, tmp / f"out-{label}", experts=32, calib=dump, device=where,
                                      progress=False)
        results[label] = (time.perf_counter() - start, summary)
        peak = f", peak device memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if where != "cpu" else ""
        stages = ", ".join(f"{k} {v:.1f}" for k, v in summary.stages.items())
        print(f"rewrite 64 -> 32 on {where}: {results[label][0]:.1f} s{peak}; busy seconds: {stages}; "
              f"segments reassigned {summary.segments_reassigned} of {summary.segments_pooled}")
    audits = {label: json.loads((tmp / f"out-{label}" / "dern_stream.json").read_text()) for label in results}
    same_kept = all(audits["dev"]["layers"][i]["kept"] == audits["ref"]["layers"][i]["kept"]
                    for i in audits["ref"]["layers"])
    a, b = Checkpoint(tmp / "out-dev"), Checkpoint(tmp / "out-ref")
    # Where two kept experts are equally close to a pooled segment (upcycled copies), the devices' rounding can
    # send it to either: the layer is then rebuilt from other members, equally valid, and far from the other's.
    same_transfers = sum(audits["dev"]["layers"][i]["transfers"] == audits["ref"]["layers"][i]["transfers"]
                         for i in audits["ref"]["layers"])
    diffs, names = [], list(b.entries)
    for name in names:
        x, y = a.load(name).double(), b.load(name).double()
        norm = float(torch.linalg.vector_norm(y))
        diffs.append(float(torch.linalg.vector_norm(x - y)) / norm if norm else float(torch.linalg.vector_norm(x)))
    diffs = np.array(diffs)
    print(f"agreement: same kept experts in every layer: {same_kept}; same transfers in {same_transfers} of "
          f"{len(audits['ref']['layers'])} layers; tensors identical: {int((diffs == 0).sum())} of {len(diffs)}; "
          f"relative difference median {np.median(diffs):.2e}, over 1e-2 in {int((diffs > 1e-2).sum())}, largest "
          f"{diffs.max():.2e} ({names[int(diffs.argmax())]}); {device} / cpu wall time "
          f"{results['dev'][0] / results['ref'][0]:.2f}")


def recipe_on_device(src: Path, dump: Path, tmp: Path, device: str) -> None:
    """The default setting and the best recipe on the device: their cost against the paper's DERN there, and the
    plan's memory bound."""
    seconds, peaks = {}, {}
    estimate = dern_stream.plan(src, experts=32, calib=dump, recipe="best", device=device,
                                progress=False).estimates.device_peak
    for label, options in (("paper", {"recipe": "paper"}), ("default", {}), ("best", {"recipe": "best"})):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = dern_stream.rewrite(src, tmp / f"out-{label}-again", experts=32, calib=dump, device=device,
                                      progress=False, **options)
        seconds[label] = time.perf_counter() - start
        stages = ", ".join(f"{k} {v:.1f}" for k, v in summary.stages.items())
        peaks[label] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    audit = json.loads((tmp / "out-best-again" / "dern_stream.json").read_text())
    steps = [(layer.get("output_error") or {}).get("gradient_steps") for layer in audit["layers"].values()]
    memory = (f"; peak device memory {peaks['best'] / 1e9:.2f} GB against the plan's estimate "
              f"{estimate / 1e9:.2f} GB (paper {peaks['paper'] / 1e9:.2f} GB, default {peaks['default'] / 1e9:.2f} GB)"
              if peaks["best"] is not None else "")
    print(f"on {device}: default {seconds['default']:.1f} s, recipe best {seconds['best']:.1f} s, against the paper's "
          f"DERN {seconds['paper']:.1f} s (x{seconds['default'] / seconds['paper']:.1f} and "
          f"x{seconds['best'] / seconds['paper']:.1f}; best's busy seconds: {stages}); gradient steps per layer "
          f"{steps}{memory}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--suite", action="store_true", help="also run the whole default test suite (a few minutes)")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device here: nothing to check (see --device cpu)")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        src = write_synthetic(tmp / "ck", layers=a.layers, hidden=1024, intermediate=512, experts=64, upcycled=0.3)
        print(f"synthetic checkpoint: {a.layers} layers of 64 experts x 512 neurons, hidden 1024 "
              f"({time.perf_counter() - started:.0f} s to write)")
        dump = dump_both(src, tmp, a.device, a.tokens)
        rewrite_both(src, dump, tmp, a.device)
        recipe_on_device(src, dump, tmp, a.device)
    if not a.skip_tests:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        print("tests/test_cuda.py:", (run.stdout.strip().splitlines() or ["no output"])[-1])
    if a.suite:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        print("the default suite on this machine:",
              *[line for line in run.stdout.splitlines() if line.startswith("FAILED")],
              (run.stdout.strip().splitlines() or ["no output"])[-1], sep="\n  ")
    print(f"gpu_check took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
