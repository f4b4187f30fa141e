"""The plan's memory estimate of `--recipe best` on the layer shapes of large public MoE models, from the shapes
alone (dern_stream.rewriter.estimates: the figure `dern-stream plan` prints; not a measurement).

    python benchmarks/estimate_shapes.py [--ratio 0.5] [--dump-tokens 262144] [--fit-tokens 131072 32768]
                                         [--groups 0 32 8]

For each shape, fit-sample size and `--refit-group` (0: all kept experts together), the estimated peak of device
memory on a GPU (experts stored as published: bf16, or FP8 with block scales; the dump's default 262144 tokens
per layer).
"""

from __future__ import annotations

import argparse

from dern_stream.layout.moe_layers import ModelShape
from dern_stream.options import RewriteOptions
from dern_stream.rewriter.estimates import estimate
from dern_stream.storage import ExpertStorage

# name: (routed experts, hidden, expert intermediate, experts per token, FP8 scale block or None for bf16), from the
# models' config.json as published
SHAPES = {
    "Mixtral-8x7B": (8, 4096, 14336, 2, None),
    "Qwen3-30B-A3B": (128, 2048, 768, 8, None),
    "GLM-4.5-Air": (128, 4096, 1408, 8, None),
    "DeepSeek-V3": (256, 7168, 2048, 8, (128, 128)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="share of the experts kept")
    ap.add_argument("--dump-tokens", type=int, default=262144)
    ap.add_argument("--fit-tokens", type=int, nargs="+", default=[131072, 32768])
    ap.add_argument("--groups", type=int, nargs="+", default=[0, 32, 8])
    a = ap.parse_args()
    for name, (n, d, h, top_k, block) in SHAPES.items():
        storage = ExpertStorage(block=block)
        k = max(1, round(n * a.ratio))
        cells = []
        for fit in a.fit_tokens:
            for group in a.groups:
                if group >= k:
                    continue
                options = RewriteOptions.build(k, "best", fit_tokens=fit, refit_group=group or None)
                peak = estimate(ModelShape(n, d, h), options, storage, 1 if block else 2, a.dump_tokens, top_k,
                                True, True).device_peak
                cells.append(f"fit {fit}, group {group or 'all'}: {peak / 1e9:.1f} GB")
        stored = "FP8" if block else "bf16"
        print(f"{name} ({n} {stored} experts, hidden {d}, intermediate {h}, top-{top_k}) -> {k}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
