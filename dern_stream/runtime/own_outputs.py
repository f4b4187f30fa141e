"""How dern-stream tells its own earlier output from anything else, by the files alone (no torch): a target that
`--overwrite` may replace must be the tool's own (a report directory, a JSON record); anything else is the user's
and is never deleted. (A rewrite's output: checkpoint/output_dir.py; a dump: calib/dump_files.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

REPORT_FORMAT = "dern-stream report 1"
PLOTS = ("importance", "reassigned", "pairs", "similarity", "clusters", "error")
REPORT_FILES = {"report.json", "index.html", *(f"{name}.png" for name in PLOTS)}


def not_a_report(path: Path) -> str | None:
    """Why the directory `path` is not a report that dern-stream wrote (None when it is): its report.json says
    so, and it holds nothing but the files a report writes (so replacing it deletes nothing of anyone's)."""
    try:
        own = json.loads((path / "report.json").read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        own = False
    if not own:
        return "is not a report that dern-stream wrote"
    for item in sorted(path.iterdir()):
        if item.name not in REPORT_FILES or item.is_symlink() or not item.is_file():
            return f"holds {item.name}, which a report never writes"
    return None


def not_json_of(fmt: str, command: str) -> Callable[[Path], str | None]:
    """For check_replaceable: why an existing file is not a JSON report with "format": `fmt` (None when it is)."""
    def why(path: Path) -> str | None:
        try:
            own = json.loads(path.read_text()).get("format") == fmt
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            own = False
        return None if own else f"is not a report that {command} wrote"
    return why
