"""`plan` and a pruning `rewrite` of a checkpoint of Kimi-K2-Thinking's size and storage (61 layers of 384 experts,
hidden 7168, 2048 neurons, int4 in groups of 32 as compressed-tensors packs them: 594 GB), written as sparse files
(headers and holes, every value zero), so the input costs no disk and the time is the tool's own.

    python benchmarks/sparse_rewrite.py [--workdir DIR] [--experts 16 32] [--repeat 2] [--json FILE]

Each run is a fresh process timed from start to exit, imports included; its peak memory is the kernel's VmHWM. The
K values run in turn, --repeat times, and the fastest of each is taken (the machine is shared). The smallest K is
the baseline: a larger K's time against its output's size, both as ratios to the baseline's, shows whether the
rewrite's time follows what it writes (the kept experts) rather than what it could read (all of them). The
rewrite ranks by router norm (no dump: a dump of this model is hundreds of GB too) and prunes; the holes of the
input stay holes in the output, whose disk use is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dern_stream.storage.formats import CompressedWeights
from dern_stream.synthetic import write_sparse

_RUN = r"""
import sys, dern_stream
call = dern_stream.plan if sys.argv[1] == "plan" else dern_stream.rewrite
args = (sys.argv[2],) if sys.argv[1] == "plan" else (sys.argv[2], sys.argv[3])
result = call(*args, experts=int(sys.argv[4]), method="prune", importance="router-norm", progress=False)
if sys.argv[1] == "plan":
    print("estimate", result.estimates.host_peak, result.output_bytes)
print("VmHWM", [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def run(what: str, src: Path, out: Path, experts: int) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, what, str(src), str(out), str(experts)], check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    fields = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return seconds, fields


def disk_bytes(directory: Path) -> tuple[int, int]:
    files = list(directory.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        int4 = CompressedWeights("pack-quantized", 4, "int", True, "group", 32)
        src = write_sparse(tmp / "kimi", layers=61, hidden=7168, intermediate=2048, experts=384, top_k=8,
                           compressed=int4)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"input: {size / 1e9:.0f} GB in {len(list(src.glob('*.safetensors')))} shards (sparse)")
        best: dict[tuple[str, int], tuple[float, dict]] = {}
        for _ in range(a.repeat):
            for k in a.experts:
                for what in ("plan", "rewrite"):
                    out = tmp / f"out-{k}"
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                    seconds, fields = run(what, src, out, k)
                    if what == "rewrite":
                        fields["bytes"], fields["disk"] = disk_bytes(out)
                    if (what, k) not in best or seconds < best[what, k][0]:
                        best[what, k] = (seconds, fields)
        rows = []
        base_k = a.experts[0]
        for k in a.experts:
            plan_s, plan = best["plan", k]
            rewrite_s, rewrite = best["rewrite", k]
            estimate, measured = int(plan["estimate"].split()[0]), int(rewrite["VmHWM"]) * 1024
            row = {"experts": k, "plan_s": round(plan_s, 1), "rewrite_s": round(rewrite_s, 1),
                   "output_bytes": rewrite["bytes"], "output_disk_bytes": rewrite["disk"],
                   "rewrite_peak_rss": measured, "estimated_peak": estimate,
                   "time_ratio": round(rewrite_s / best["rewrite", base_k][0], 2),
                   "output_ratio": round(rewrite["bytes"] / best["rewrite", base_k][1]["bytes"], 2)}
            rows.append(row)
            print(f"K={k}: plan {plan_s:.1f} s; rewrite {rewrite_s:.1f} s of {rewrite['bytes'] / 1e9:.1f} GB output "
                  f"({rewrite['disk'] / 1e6:.0f} MB on disk); peak RSS {measured / 1e9:.2f} GB against "
                  f"{estimate / 1e9:.2f} GB estimated; x{row['time_ratio']} the K={base_k} time for "
                  f"x{row['output_ratio']} its output")
        if a.json:
            a.json.write_text(json.dumps({"input_bytes": size, "repeat": a.repeat, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
