"""What the recommended recipe costs against plain DERN: wall time and peak host memory of the rewrite.

    python benchmarks/recipe_cost.py [--root benchmarks/.fixtures] [--fixture mixtral-scratch] [--ratio 0.5]
                                     [--configs "dern (paper)" "best (recipe)" ...] [--json FILE]

Each configuration (names from benchmarks/quality.py) rewrites the fixture in a fresh Python process, one after
the other, so that each process's peak resident memory (ru_maxrss) is its own; the same process measures its
wall time around `dern_stream.rewrite`. Prints each against the first configuration, measured in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402
import quality  # noqa: E402

_CHILD = r"""
import json, resource, sys, time
import dern_stream
model, out, calib, keep, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
started = time.perf_counter()
dern_stream.rewrite(model, out, experts=keep, calib=calib, overwrite=True, progress=False, **kwargs)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model: Path, calib: Path, keep: int, kwargs: dict, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(work / "out"), str(calib), str(keep),
                           json.dumps(kwargs)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = quality.fixture_parser(__doc__.splitlines()[0], 0.5, ["dern (paper)", "best (recipe)"])
    parser.add_argument("--calib-tokens", type=int, default=quality.CALIB_TOKENS,
                        help="Which calibration dump of quality.py to use (its --calib-tokens).")
    args = parser.parse_args()
    model = fixtures.build_all(args.root, [args.fixture])[args.fixture]
    calib = quality.calib_dump_path(args.root, args.fixture, args.calib_tokens)
    if not calib.exists():
        raise SystemExit(f"{calib} is missing: run benchmarks/quality.py --fixtures {args.fixture} "
                         f"--calib-tokens {args.calib_tokens} first")
    keep = max(1, round(quality.expert_count(model) * args.ratio))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dern-cost-") as work:
        for label in args.configs:
            row = {"config": label, **measure(model, calib, keep, quality.CONFIGS[label], Path(work))}
            rows.append(row)
            base = rows[0]
            print(f"{label:<28} {row['seconds']:7.1f} s (x{row['seconds'] / base['seconds']:.2f})  "
                  f"peak RSS {row['peak_rss_mib']:7.0f} MiB (x{row['peak_rss_mib'] / base['peak_rss_mib']:.2f})",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"fixture": args.fixture, "experts": keep, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
