"""Small files written whole and flushed to disk (no torch here: the command line's refusals use it)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import writing


def write_durably(path: Path, data: bytes) -> None:
    """Write a small file and flush it to disk (it joins the output only once it is there)."""
    with writing(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_replacing(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.dern-tmp-{os.getpid()}")
    try:
        with writing(path):
            write_durably(tmp, data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
