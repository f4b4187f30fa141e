"""Peak memory, time and fit of the gradient refit with its experts moved a group at a time (`--refit-group`),
against all of them together, measured in the same run.

    python benchmarks/refit_group.py [--hidden 1024] [--intermediate 1024] [--experts 32] [--groups 8 4]
                                     [--steps 100] [--tokens 8192] [--workdir DIR] [--json FILE]

Writes a one-layer synthetic bf16 Mixtral-layout checkpoint (upcycled experts: copies of one expert plus noise,
so that the kept experts can learn what the dropped ones did) and a calibration dump of random inputs, then
rewrites it to half the experts in a fresh process per setting: pruning, the down refit, then `--steps` gradient
steps with a 20% held-out share, with all kept experts in one group and then with each `--groups` size. Prints
each process's peak resident memory (ru_maxrss), its wall time, the plan's host-memory estimate, and the layer's
output error on the held-out rows after the steps (from the audit), each against the one-group run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dern_stream.synthetic import write_synthetic, write_synthetic_dump

_CHILD = r"""
import json, resource, sys, time
import dern_stream
src, out, calib, keep, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
estimate = dern_stream.plan(src, experts=keep, calib=calib, progress=False, **kwargs).estimates.host_peak
started = time.perf_counter()
dern_stream.rewrite(src, out, experts=keep, calib=calib, overwrite=True, progress=False, **kwargs)
seconds = time.perf_counter() - started
layers = json.load(open(out + "/dern_stream.json"))["layers"]
fits = [layer["output_error"] for layer in layers.values()]
print(json.dumps({"seconds": seconds, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "estimate": estimate, "error": sum(f["error"] for f in fits) / len(fits),
                  "steps": [f.get("gradient_steps_per_group", f.get("gradient_steps")) for f in fits]}))
"""


def measure(src: Path, calib: Path, keep: int, kwargs: dict, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), str(calib), str(keep),
                           json.dumps(kwargs)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--workdir", default=".", help="where the synthetic checkpoint and outputs go")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    a = ap.parse_args()
    keep = a.experts // 2
    weights = 3 * keep * a.hidden * a.intermediate
    print(f"{a.experts} experts of {a.intermediate} neurons, hidden {a.hidden}, {a.experts} -> {keep}: "
          f"{weights / 1e6:.1f}M kept expert weights per layer; {a.steps} steps, {a.tokens} cached tokens")
    results = {}
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        src = write_synthetic(Path(tmp) / "ck", layers=1, hidden=a.hidden, intermediate=a.intermediate,
                              experts=a.experts, vocab=2048, upcycled=0.3)
        calib = write_synthetic_dump(src, Path(tmp) / "calib.zarr", tokens=a.tokens)
        for group in [None, *a.groups]:
            kwargs = dict(method="prune", refit=True, refit_steps=a.steps, holdout=0.2, fit_tokens=a.tokens,
                          refit_group=group)
            r = results[str(group or keep)] = measure(src, calib, keep, kwargs, Path(tmp) / "out")
            first = results[str(keep)]
            print(f"  group of {group or keep:3d}: peak RSS {r['peak'] / 1e9:.3f} GB "
                  f"(x{r['peak'] / first['peak']:.2f}), estimate {r['estimate'] / 1e9:.3f} GB, "
                  f"{r['seconds']:.1f} s (x{r['seconds'] / first['seconds']:.2f}), held-out error {r['error']:.4f} "
                  f"(x{r['error'] / first['error']:.3f}), steps {r['steps']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
