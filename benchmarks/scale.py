"""A compute-bound DERN rewrite to half the experts by one process, then by N local workers (and by a local
Ray cluster of N CPUs with --ray): wall times, the speed-up, and whether the outputs are byte-identical.
Then `dern-stream plan` on a 600 GB checkpoint of sparse files.

    python benchmarks/scale.py [--workdir DIR] [--layers 8] [--workers 2] [--repeat 3] [--recipe paper] [--ray]

Every run is a fresh process (`dern-stream rewrite ... -q`), timed from start to exit, imports included; one
process and the workers run in turn, `--repeat` times, and the fastest of each is taken (the machine is shared).
Each worker computes with its share of the driver's torch threads (cores / workers). The comparison is also made
with one thread per process (OMP_NUM_THREADS=1 on both sides), where each worker brings its own core, as it
would bring its own GPU or node.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dern_stream.synthetic import write_sparse, write_synthetic, write_synthetic_dump

_RAY_RUN = r"""
import sys, ray, dern_stream
ray.init(num_cpus=int(sys.argv[4]), include_dashboard=False, log_to_driver=False)
dern_stream.rewrite(sys.argv[1], sys.argv[2], experts=int(sys.argv[5]), calib=sys.argv[3], ray="auto",
                    recipe=sys.argv[6], progress=False)
"""


def timed(cmd: list[str], threads: int | None = None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def fastest(repeat: int, first: list[str], second: list[str], threads: int | None = None) -> tuple[float, float]:
    """The fastest of `repeat` runs of each command, run in turn."""
    times = [(timed(first, threads), timed(second, threads)) for _ in range(repeat)]
    return min(t[0] for t in times), min(t[1] for t in times)


def digest(directory: Path, audit: bool = True) -> str:
    """Every file's bytes; without `audit`, all but dern_stream.json (which records torch's thread count)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if audit or path.name != "dern_stream.json":
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, in turn; the fastest is taken")
    ap.add_argument("--ray", action="store_true", help="also run a local Ray cluster of --workers CPUs")
    ap.add_argument("--recipe", choices=["default", "paper", "best"], default="default",
                    help="the setting rewritten with (default: what a rewrite runs without --recipe)")
    a = ap.parse_args()
    cli = [sys.executable, "-m", "dern_stream.cli"]
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        src = write_synthetic(tmp / "ck", layers=a.layers, hidden=1024, intermediate=a.intermediate,
                              experts=a.experts, upcycled=0.3)
        dump = write_synthetic_dump(src, tmp / "calib.zarr", tokens=2048)
        keep = str(a.experts // 2)
        args = [str(src), "--experts", keep, "--calib", str(dump), "--recipe", a.recipe, "-q"]
        one, many = fastest(a.repeat, [*cli, "rewrite", args[0], str(tmp / "one"), *args[1:], "--overwrite"],
                            [*cli, "rewrite", args[0], str(tmp / "many"), *args[1:], "--workers", str(a.workers),
                             "--overwrite"])
        print(f"DERN (recipe {a.recipe}) {a.experts} -> {keep} experts, {a.layers} layers (hidden 1024, "
              f"intermediate {a.intermediate}), "
              f"fastest of {a.repeat} interleaved runs:")
        print(f"  torch's default threads ({os.cpu_count()} cores): one process {one:.1f} s; {a.workers} local workers "
              f"(sharing the threads out) {many:.1f} s; speed-up {one / many:.2f}x; "
              f"byte-identical: {digest(tmp / 'one') == digest(tmp / 'many')}")
        # With one thread each, every worker brings its own core, as each would bring its own GPU or node.
        alone, spread = fastest(a.repeat, [*cli, "rewrite", args[0], str(tmp / "alone"), *args[1:], "--overwrite"],
                                [*cli, "rewrite", args[0], str(tmp / "spread"), *args[1:], "--workers",
                                 str(a.workers), "--overwrite"], threads=1)
        same = digest(tmp / "one", audit=False) == digest(tmp / "alone", audit=False)
        print(f"  one thread per process: one process {alone:.1f} s; {a.workers} local workers {spread:.1f} s; "
              f"speed-up {alone / spread:.2f}x; byte-identical: {digest(tmp / 'alone') == digest(tmp / 'spread')}; "
              f"tensors as with the default threads: {same}")
        if a.ray:
            ray = timed([sys.executable, "-c", _RAY_RUN, str(src), str(tmp / "ray"), str(dump), str(a.workers), keep,
                         a.recipe])
            print(f"  Ray, {a.workers} CPUs (cluster start included): {ray:.1f} s; speed-up {one / ray:.2f}x; "
                  f"byte-identical: {digest(tmp / 'one') == digest(tmp / 'ray')}")

        big = write_sparse(tmp / "big", layers=62, hidden=4096, intermediate=3072, experts=128)
        size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
        plan = timed([*cli, "plan", str(big), "--experts", "64", "-q"])
        imports = timed([sys.executable, "-c", "import dern_stream.api"])
        print(f"plan of a {size / 1e9:.0f} GB checkpoint (62 layers of 128 experts, sparse files): {plan:.1f} s, "
              f"of which {imports:.1f} s is importing Python, torch and dern_stream")


if __name__ == "__main__":
    main()
