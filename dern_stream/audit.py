"""dern_stream.json: what a rewrite did, per layer, so it can be audited and reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch

from . import __version__
from .layer_rewrite import LayerReport
from .options import RewriteOptions


def audit_record(
    *,
    source: Path,
    fingerprint: str,
    calib: Path | None,
    model_type: str,
    num_experts: int,
    intermediate: int,
    options: RewriteOptions,
    config_notes: list[str],
    reports: list[LayerReport],
) -> dict:
    layers = {}
    for rep in reports:
        res = rep.result
        nonzero = res.counts.nonzero().tolist()
        layers[str(rep.index)] = {
            "kept": res.kept,
            "importance": rep.importance,
            "importance_source": rep.importance_source,
            "calibration_tokens": rep.tokens,
            "segments_reassigned": res.segments_reassigned,
            # [dropped expert, kept expert, segments moved], original expert indices
            "transfers": [[res.dropped[o], res.kept[r], int(res.counts[o, r])] for o, r in nonzero],
            "rebuilt_experts": [k for k, e in zip(res.kept, res.experts, strict=True) if e is not None],
            "kmeans_iterations": res.kmeans_iterations,
        }
    return {
        "dern_stream_version": __version__,
        "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__},
        "method": "dern",
        "options": options.method_record(),
        "source": {"path": str(source), "fingerprint": fingerprint, "model_type": model_type,
                   "num_experts": num_experts, "intermediate_size": intermediate},
        "calibration": str(calib) if calib is not None else None,
        "num_experts": options.experts,
        "intermediate_size": options.intermediate_size or intermediate,
        "config_notes": config_notes,
        "layers": layers,
    }


def write_audit(directory: Path, record: dict) -> None:
    (directory / "dern_stream.json").write_text(json.dumps(record, indent=2) + "\n")
