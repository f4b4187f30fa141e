"""Whether a directory is a calibration dump that dern-stream wrote, told from its files alone (no zarr, no
torch here: the command line's refusals use it before anything heavy loads)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DernError

FORMAT = "dern-stream-calib"


def check_dump_path(path: Path) -> None:
    """A readable calibration dump is there: it exists, and its zarr.json is a zarr v3 group's with dern-stream's
    format attribute (what the store checks first, told without opening it)."""
    path = Path(path)
    if not path.exists():
        raise DernError(f"calibration dump {path} does not exist")
    try:
        meta = json.loads((path / "zarr.json").read_text())
        attrs = meta["attributes"] if meta.get("zarr_format") == 3 and meta.get("node_type") == "group" else None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        attrs = None
    if not isinstance(attrs, dict):
        raise DernError(f"{path} is not a zarr v3 calibration dump")
    if attrs.get("format") != FORMAT:
        raise DernError(f"{path} is not a dern-stream calibration dump (format attribute missing)")

# What a dump directory holds: zarr's metadata and its three groups.
_DUMP_ENTRIES = {"zarr.json", "moe_inputs", "tokens", "resume"}


def not_a_dump(path: Path) -> str | None:
    """Why the existing `path` is not a calibration dump that dern-stream wrote (None when it is, or when
    it is an empty directory): only such a dump may be replaced or resumed."""
    if not path.is_dir():
        return "exists and is not a directory"
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return None
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        is_dump = isinstance(attrs, dict) and attrs.get("format") == FORMAT
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        is_dump = False
    if not is_dump:
        return "exists and is not a calibration dump"
    foreign = sorted(e for e in entries - _DUMP_ENTRIES if not e.endswith(".partial"))  # zarr's own temp files
    foreign += [str(p.relative_to(path)) for group in sorted(entries & _DUMP_ENTRIES - {"zarr.json"})
                for p in sorted((path / group).rglob("*")) if not _zarr_entry(p.relative_to(path).parts, p.is_dir())]
    return f"holds {foreign[0]}, which a dump never writes" if foreign else None


def _zarr_entry(parts: tuple[str, ...], is_dir: bool) -> bool:
    """A path inside a dump's group that zarr writes: folders of groups and arrays, their metadata,
    chunk files under `c/` (named by chunk index), and zarr's temporary files."""
    if "c" in parts[1:]:
        return all(p.isdigit() for p in parts[parts.index("c", 1) + 1:]) or parts[-1].endswith(".partial")
    if is_dir:
        return len(parts) <= 3 and not parts[-1].startswith(".")
    return parts[-1] == "zarr.json" or parts[-1].endswith(".partial")
