"""`dern-stream report`: what a finished rewrite did, from its dern_stream.json, as report.json, PNG plots
(report_plots.py) and one HTML page (report_page.py). Torch-free; matplotlib only when the plots are drawn."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.checksums import record_checksum
from ..errors import DernError
from ..runtime.durable_files import write_durably
from ..runtime.optional_packages import require_matplotlib
from ..runtime.own_outputs import REPORT_FORMAT, not_a_report
from ..runtime.targets import check_apart, check_replaceable

RECORD_NAME = "dern_stream.json"


@dataclass
class ReportSummary:
    directory: Path
    images: list[str]
    missing: dict[str, str]  # plot -> why it is not drawn

    def __str__(self) -> str:
        count = len(self.images)
        lines = [f"report: {self.directory / 'index.html'} ({count} plot{'s' if count != 1 else ''})"]
        lines += [f"  not drawn: {name}: {why}" for name, why in self.missing.items()]
        return "\n".join(lines)


def read_record(out: str | os.PathLike) -> dict:
    """The dern_stream.json of a finished rewrite output `out` (one line if there is none or it is unreadable)."""
    path = Path(out).expanduser() / RECORD_NAME
    if not Path(out).expanduser().is_dir():
        raise DernError(f"{out} is not a directory; give a rewrite's output directory")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DernError(f"{out} has no {RECORD_NAME}: it is not the output of a finished dern-stream rewrite") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DernError(f"{path} cannot be read as JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
        raise DernError(f"{path} is not a dern-stream record (no per-layer entries)")
    if "record_checksum" in record and record["record_checksum"] != record_checksum(record):
        raise DernError(f"{path} was changed since the rewrite wrote it (its record_checksum does not match); the "
                        "report draws only the record as written")
    return record


def report_data(record: dict) -> dict:
    """Everything the plots and the page show, as plain numbers, ordered by layer."""
    options = record.get("options", {})
    source = record.get("source", {})
    layers = []
    for key in sorted(record["layers"], key=int):
        entry = record["layers"][key]
        fit = entry.get("output_error") or {}
        chosen = next((c for c in fit.get("candidates", []) if c.get("candidate") == fit.get("chosen")), None)
        importance = [float(x) for x in entry.get("importance", [])]
        kept = [int(e) for e in entry.get("kept", [])]
        if importance and not all(0 <= e < len(importance) for e in kept):
            raise ValueError(f"layer {key} keeps an expert it has no importance for")
        layers.append({
            "layer": int(key),
            "kept": kept,
            "importance": importance,
            "importance_source": entry.get("importance_source"),
            "segments_reassigned": int(entry.get("segments_reassigned", 0)),
            "transfers": [[int(a), int(b), int(c)] for a, b, c in entry.get("transfers", [])],
            "rebuilt_experts": [int(e) for e in entry.get("rebuilt_experts", [])],
            "kmeans_iterations": [int(i) for i in entry.get("kmeans_iterations", [])],
            "similarity_histogram": [int(c) for c in entry.get("similarity_histogram", [])],
            "cluster_sizes": [[int(size), int(count)] for size, count in entry.get("cluster_sizes", [])],
            "chosen": fit.get("chosen"),
            "error_before_refit": float(chosen["error"]) if chosen else None,
            # after every refit the layer went through: the gradient steps' result where they ran
            "error_after_refit": float(fit["error_after_gradient"]) if fit.get("gradient_steps")
            else float(chosen["error_after_refit"]) if chosen and "error_after_refit" in chosen else None,
            "gradient_steps": int(fit.get("gradient_steps") or 0),
            "error_held_out": fit.get("error_on") == "held-out rows",
        })
    if any(t[0] not in range(len(e["importance"]) or 1 << 30) or t[1] not in e["kept"]
           for e in layers for t in e["transfers"]):
        raise ValueError("a transfer names an expert the layer does not have")
    if len({len(e["similarity_histogram"]) for e in layers if e["similarity_histogram"]}) > 1:
        raise ValueError("the layers' similarity histograms have different bins")
    alphas = [float(a) for a in (options.get("alpha_candidates") or [options.get("alpha")]) if a is not None]
    return {
        "format": REPORT_FORMAT,
        "model_type": source.get("model_type"),
        "source": source.get("repo_id") or source.get("name") or (Path(source["path"]).name if "path" in source
                                                                   else None),
        "experts_before": source.get("num_experts"),
        "experts_after": record.get("num_experts"),
        "intermediate_before": source.get("intermediate_size"),
        "intermediate_after": record.get("intermediate_size"),
        "method": record.get("method"),
        "recipe": record.get("recipe"),
        "alphas": alphas,
        "options": options,
        "dern_stream_version": record.get("dern_stream_version"),
        "layers": layers,
        # `eval --tasks` reports given to `card --eval` (kept in the record): the page's task table
        "task_scores": [{"model": e.get("model"), "reference_model": e.get("reference_model"), "scores": e["scores"]}
                        for e in record.get("evaluations") or [] if isinstance(e, dict) and e.get("kind") == "tasks"
                        and isinstance(e.get("scores"), list)],
    }


def check_report_target(directory: str | os.PathLike, overwrite: bool, reads: dict[str, str | os.PathLike | None]
                        ) -> Path:
    """A report directory, resolved: apart from what the command reads, and new, empty, or (with
    `overwrite`) an earlier report."""
    target = Path(directory).expanduser().resolve()
    check_apart(target, "report directory", reads)
    check_replaceable(target, "report directory", overwrite, not_a_report)
    if not target.parent.is_dir():
        raise DernError(f"report directory {target}: the folder {target.parent} does not exist")
    return target


def write_report(out: str | os.PathLike, directory: str | os.PathLike | None = None, *, overwrite: bool = False,
                 reads: dict[str, str | os.PathLike | None] | None = None) -> ReportSummary:
    """The report of the rewrite output `out` into `directory` (default `out/report`): report.json, the
    plots and index.html. It is assembled beside `directory` and moved into place whole; an existing
    `directory` is replaced only with `overwrite`, and only if it is an earlier report."""
    record = read_record(out)
    target = check_report_target(directory if directory is not None else Path(out).expanduser() / "report",
                                 overwrite, reads or {})
    require_matplotlib()
    from .report_page import render_page
    from .report_plots import draw_plots

    try:
        data = report_data(record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DernError(f"{Path(out) / RECORD_NAME}: its entries are not what a rewrite writes ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); the report cannot be drawn") from None
    staging = target.with_name(f".{target.name}.dern-report-partial")  # (not a rewrite's `.NAME.dern-partial`)
    shutil.rmtree(staging, ignore_errors=True)  # an earlier attempt's, named by this tool
    staging.mkdir()
    try:
        images, missing = draw_plots(data, staging)
        data["images"], data["not_drawn"] = images, missing
        write_durably(staging / "report.json", (json.dumps(data, indent=2) + "\n").encode())
        write_durably(staging / "index.html", render_page(data).encode())
        if check_replaceable(target, "report directory", overwrite, not_a_report):
            shutil.rmtree(target)
        elif target.is_dir():
            target.rmdir()  # empty
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReportSummary(target, list(images.values()), missing)
