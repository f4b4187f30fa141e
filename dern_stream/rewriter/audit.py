"""dern_stream.json: what a rewrite did, per layer, so it can be audited and reproduced."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import write_durably
from ..checkpoint.checksums import record_checksum, sealed_record
from ..checkpoint.run_identity import versions
from ..options import RewriteOptions
from ..runtime.device import device_name
from .layer_report import LayerReport


def audit_record(
    *,
    source: dict,
    fingerprint: str,
    calib: Path | None,
    model_type: str,
    num_experts: int,
    intermediate: int,
    options: RewriteOptions,
    config_notes: list[str],
    layers: dict[str, dict],
    run: dict | None = None,
    device: torch.device | None = None,
    calib_provenance: dict | None = None,
    checksums: dict | None = None,
    parameters: dict | None = None,
) -> dict:
    """The whole record; `layers` maps layer index to `layer_record(...)` with the checksums of the
    tensors that layer's write wrote under "checksums"; they are gathered into `checksums["tensors"]`
    (`checksums` also holds the algorithm and the shard headers' and other files' checksums). `source`
    names the input (hub.source_record: a Hub repo, revision and commit, or a directory's name);
    `parameters` the input's and the output's parameter counts (parameter_count.py). Nothing in
    it varies between two runs of the same command (no times, no process ids), so reruns stay
    byte-identical."""
    tensors = {name: value for record in layers.values() for name, value in record.get("checksums", {}).items()}
    layers = {i: {k: v for k, v in record.items() if k != "checksums"} for i, record in layers.items()}
    return {
        "dern_stream_version": __version__,
        "versions": versions(),
        # What reproduces the output bit for bit: these versions, this device type, the options below and
        # inputs with these fingerprints (`resume_key` is what an interrupted run must match to be resumed).
        "reproduce": {
            "device_type": device.type if device is not None else None,
            "device_name": device_name(device),
            "torch_threads": run.get("threads"),  # (what each layer was computed with: plan.py)
            "calibration_provenance": _named(calib_provenance),
            "resume_key": run,
        },
        "method": options.method,
        "recipe": options.recipe,
        "options": options.method_record(),
        "source": {**source, "fingerprint": fingerprint, "model_type": model_type,
                   "num_experts": num_experts, "intermediate_size": intermediate},
        # Names, not paths: the record travels with the output (to the Hub), the paths said where things lay on one
        # machine; the dump's fingerprint in `reproduce` identifies it.
        "calibration": calib.name if calib is not None else None,
        "num_experts": options.experts,
        "intermediate_size": options.intermediate_size or intermediate,
        "config_notes": config_notes,
        "layers": layers,
        "parameters": parameters,
        # What verify checks every byte of the output against (docs/safety.md, "verify").
        "checksums": {**(checksums or {}), "tensors": dict(sorted(tensors.items()))},
    }


def _named(provenance: dict | None) -> dict | None:
    """The dump's provenance with its text and tokenizer named by file or folder name, not by path."""
    if provenance is None:
        return None
    named = dict(provenance)
    kind, sep, where = str(named.get("source") or "").partition(":")
    if sep and kind == "text":
        named["source"] = f"text:{Path(where).name}"
    if isinstance(named.get("tokenizer"), str):
        named["tokenizer"] = Path(named["tokenizer"]).name
    return named


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
        # Pooled segments per bin of their best cosine to a kept expert (bins 0.05 wide over [-1, 1]; the report
        # draws them against alpha), and [members, clusters] of the rebuilt experts' k-means clusters.
        **({"similarity_histogram": res.similarity_histogram} if res.similarity_histogram else {}),
        **({"cluster_sizes": res.cluster_sizes} if res.cluster_sizes else {}),
        **({"output_error": report.fit} if report.fit else {}),
        **({"requantization_error": report.requantization_error} if report.requantization_error is not None else {}),
    }


def write_audit(directory: Path, record: dict) -> None:
    """dern_stream.json, with the checksum of its own content (`record_checksum`, see record_checksum)."""
    write_durably(directory / "dern_stream.json", sealed_record(record))


__all__ = ["audit_record", "layer_record", "record_checksum", "write_audit"]
