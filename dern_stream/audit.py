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
    layers: dict[str, dict],
) -> dict:
    """The whole record; `layers` maps layer index to `layer_record(...)`."""
    return {
        "dern_stream_version": __version__,
        "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__},
        "method": options.method,
        "recipe": options.recipe,
        "options": options.method_record(),
        "source": {"path": str(source), "fingerprint": fingerprint, "model_type": model_type,
                   "num_experts": num_experts, "intermediate_size": intermediate},
        "calibration": str(calib) if calib is not None else None,
        "num_experts": options.experts,
        "intermediate_size": options.intermediate_size or intermediate,
        "config_notes": config_notes,
        "layers": layers,
    }


def layer_record(report: LayerReport) -> dict:
    """What one layer did, as plain numbers (the layer's tensors can be freed once this exists)."""
    res = report.result
    return {
        "kept": res.kept,
        "importance": report.importance,
        "importance_source": report.importance_source,
        "calibration_tokens": report.tokens,
        "segments_reassigned": res.segments_reassigned,
        # [dropped expert, kept expert, segments moved], original expert indices
        "transfers": [[res.dropped[o], res.kept[r], int(res.counts[o, r])] for o, r in res.counts.nonzero().tolist()],
        "rebuilt_experts": [k for k, e in zip(res.kept, res.experts, strict=True) if e is not None],
        "kmeans_iterations": res.kmeans_iterations,
        **({"output_error": report.fit} if report.fit else {}),
    }


def write_audit(directory: Path, record: dict) -> None:
    (directory / "dern_stream.json").write_text(json.dumps(record, indent=2) + "\n")
