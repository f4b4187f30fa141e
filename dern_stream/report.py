"""`dern-stream report`: what a finished rewrite did, from its dern_stream.json, as report.json, PNG plots
(report_plots.py) and one HTML page (report_page.py). Torch-free; matplotlib only when the plots are drawn."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .durable_files import write_durably
from .errors import DernError
from .optional import require_matplotlib
from .targets import check_apart, check_replaceable

REPORT_FORMAT = "dern-stream report 1"
RECORD_NAME = "dern_stream.json"


@dataclass
class ReportSummary:
    directory: Path
    images: list[str]
    missing: dict[str, str]  # plot -> why it is not drawn

    def __str__(self) -> str:
        lines = [f"report: {self.directory / 'index.html'} ({len(self.images)} plots)"]
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
        layers.append({
            "layer": int(key),
            "kept": entry.get("kept", []),
            "importance": entry.get("importance", []),
            "importance_source": entry.get("importance_source"),
            "segments_reassigned": entry.get("segments_reassigned", 0),
            "transfers": entry.get("transfers", []),
            "rebuilt_experts": entry.get("rebuilt_experts", []),
            "kmeans_iterations": entry.get("kmeans_iterations", []),
            "similarity_histogram": entry.get("similarity_histogram", []),
            "cluster_sizes": entry.get("cluster_sizes", []),
            "chosen": fit.get("chosen"),
            "error_before_refit": chosen.get("error") if chosen else None,
            "error_after_refit": chosen.get("error_after_refit") if chosen else None,
        })
    alphas = options.get("alpha_candidates") or [options.get("alpha")]
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
        "alphas": [a for a in alphas if a is not None],
        "options": options,
        "dern_stream_version": record.get("dern_stream_version"),
        "layers": layers,
    }


def check_report_target(directory: str | os.PathLike, overwrite: bool, reads: dict[str, str | os.PathLike | None]
                        ) -> Path:
    """A report directory, resolved: apart from what the command reads, and new, empty, or (with
    `overwrite`) an earlier report."""
    target = Path(directory).expanduser().resolve()
    check_apart(target, "report directory", reads)
    check_replaceable(target, "report directory", overwrite, _not_a_report)
    if not target.parent.is_dir():
        raise DernError(f"report directory {target}: the folder {target.parent} does not exist")
    return target


def _not_a_report(path: Path) -> str | None:
    try:
        own = json.loads((path / "report.json").read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        own = False
    return None if own else "is not a report that dern-stream wrote"


def write_report(out: str | os.PathLike, directory: str | os.PathLike | None = None, *, overwrite: bool = False,
                 reads: dict[str, str | os.PathLike | None] | None = None) -> ReportSummary:
    """The report of the rewrite output `out` into `directory` (default `out/report`): report.json, the
    plots and index.html. It is assembled beside `directory` and moved into place whole; an existing
    `directory` is replaced only with `overwrite`, and only if it is an earlier report."""
    record = read_record(out)
    target = check_report_target(directory if directory is not None else Path(out).expanduser() / "report",
                                 overwrite, reads or {})
    require_matplotlib()  # (after the checks: it takes a second to import)
    from .report_page import render_page
    from .report_plots import draw_plots

    data = report_data(record)
    staging = target.with_name(f".{target.name}.dern-partial")
    shutil.rmtree(staging, ignore_errors=True)  # an earlier attempt's, named by this tool
    staging.mkdir()
    try:
        images, missing = draw_plots(data, staging)
        data["images"], data["not_drawn"] = images, missing
        write_durably(staging / "report.json", (json.dumps(data, indent=2) + "\n").encode())
        write_durably(staging / "index.html", render_page(data).encode())
        if check_replaceable(target, "report directory", overwrite, _not_a_report):
            shutil.rmtree(target)
        elif target.is_dir():
            target.rmdir()  # empty
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ReportSummary(target, list(images.values()), missing)
