"""FP8 requantization error of a rewrite, against the FP8 format's own rounding of the same weights.

    python benchmarks/fp8_error.py [--family deepseek_v3] [--experts 4] [--alpha 0.02] [--hidden 256]

Builds a tiny bf16 model with transformers (tiny_models), stores it as block-scaled FP8, rewrites that to
`--experts`, and prints per layer the `requantization_error` recorded in dern_stream.json beside the
baseline: ||dequant(quant(W)) - W|| / ||W|| of the original bf16 routed experts, quantized the same way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.families import family_for
from dern_stream.storage import dequantize, quantize
from dern_stream.tiny_models import build_example, save_fp8_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="deepseek_v3")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.02)
    ap.add_argument("--hidden", type=int, default=256)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, calib = build_example(Path(tmp), a.family, dtype=torch.bfloat16, hidden_size=a.hidden)
        fp8 = save_fp8_copy(model, Path(tmp) / "fp8")
        out = Path(tmp) / "out"
        dern_stream.rewrite(fp8, out, experts=a.experts, calib=calib, alpha=a.alpha, recipe="paper", progress=False)
        audit = json.loads((out / "dern_stream.json").read_text())
        src = Checkpoint(model)
        fam = family_for(src.config)
        print(f"{a.family}, hidden {a.hidden}, {fam.num_experts(src.config)} -> {a.experts} experts, alpha {a.alpha}")
        for layer, rec in audit["layers"].items():
            err = norm = 0.0
            for name in fam.expert_names(int(layer), fam.num_experts(src.config)):
                w = src.load(name).float()
                q, s = quantize(w, (128, 128))
                err += float((dequantize(q, s, (128, 128)) - w).double().square().sum())
                norm += float(w.double().square().sum())
            base = (err / norm) ** 0.5
            print(f"layer {layer}: rebuilt experts {rec['rebuilt_experts']}, requantization error "
                  f"{rec['requantization_error']:.4f}; FP8 rounding of the original experts {base:.4f}; "
                  f"ratio {rec['requantization_error'] / base:.2f}")


if __name__ == "__main__":
    main()
