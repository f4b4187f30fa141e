"""What a setting (the default, the best recipe) costs against the paper's DERN: wall time and peak host memory.

    python benchmarks/recipe_cost.py [--root benchmarks/.fixtures] [--fixture mixtral-scratch] [--ratio 0.5]
                                     [--configs "dern (paper)" "best (recipe)" ...] [--repeat N] [--json FILE]
    python benchmarks/recipe_cost.py --synthetic 64,1024,512,4 [--dump-tokens 32768] --configs "dern (paper)" default

Each configuration (names from benchmarks/quality.py) rewrites the fixture in a fresh Python process, one after
the other, so that each process's peak resident memory (ru_maxrss) is its own; the same process measures its
wall time around `dern_stream.rewrite`. With --repeat N the configurations run N times, interleaved, and each keeps
its fastest time (the machines are shared). Prints each against the first configuration, measured in the same run.
`--synthetic E,H,I,L` times a synthetic bf16 Mixtral-layout checkpoint of E experts, hidden H, I neurons per expert
and L layers instead (random experts: as in a trained model, few segments move), with a dump of --dump-tokens
random inputs per layer: the tiny fixtures' layers are too small for the compute to weigh against the fixed costs.
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
    parser.add_argument("--synthetic", help="E,H,I,L: a synthetic checkpoint of this shape instead of the fixture")
    parser.add_argument("--dump-tokens", type=int, default=32768, help="with --synthetic: inputs per layer")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dern-cost-") as work:
        work = Path(work)
        if args.synthetic:
            model, calib, experts, name = _synthetic(args.synthetic, args.dump_tokens, work)
        else:
            model, calib, experts, name = _fixture(args)
        keep = max(1, round(experts * args.ratio))
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for label in args.configs:
                row = measure(model, calib, keep, quality.CONFIGS[label], work)
                if label not in best or row["seconds"] < best[label]["seconds"]:
                    best[label] = {"config": label, **row}
        rows = [best[label] for label in args.configs]
    base = rows[0]
    for row in rows:
        print(f"{row['config']:<28} {row['seconds']:7.1f} s (x{row['seconds'] / base['seconds']:.2f})  "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB (x{row['peak_rss_mib'] / base['peak_rss_mib']:.2f})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"fixture": name, "experts": keep, "repeat": args.repeat, "runs": rows},
                                        indent=2) + "\n")


def _fixture(args) -> tuple[Path, Path, int, str]:
    model = fixtures.build_all(args.root, [args.fixture])[args.fixture]
    calib = quality.calib_dump_path(args.root, args.fixture, args.calib_tokens)
    if not calib.exists():
        raise SystemExit(f"{calib} is missing: run benchmarks/quality.py --fixtures {args.fixture} "
                         f"--calib-tokens {args.calib_tokens} first")
    return model, calib, quality.expert_count(model), args.fixture


def _synthetic(shape: str, tokens: int, work: Path) -> tuple[Path, Path, int, str]:
    from dern_stream.synthetic import write_synthetic, write_synthetic_dump

    experts, hidden, intermediate, layers = (int(v) for v in shape.split(","))
    model = write_synthetic(work / "model", layers=layers, hidden=hidden, intermediate=intermediate,
                            experts=experts, top_k=min(8, max(2, experts // 8)))
    calib = write_synthetic_dump(model, work / "calib.zarr", tokens=tokens)
    return model, calib, experts, f"synthetic {shape}"


if __name__ == "__main__":
    main()
