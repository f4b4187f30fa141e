"""Where a checkpoint is: a local directory, or a Hub repo id fetched into huggingface_hub's cache. No torch
here: the command line's refusals use it before anything heavy loads."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from ..errors import DernError, arg

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def resolve_checkpoint(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as given, or a Hub repo id (at `revision`) fetched through huggingface_hub's
    cache (hub.download: only the files a command reads; with HF_HUB_OFFLINE=1 the cache alone)."""
    path = check_checkpoint_ref(ref, revision)
    if path is not None:
        return path
    from .hub_cache import download

    try:
        return download(str(ref), revision)
    except DernError as e:
        local = _local_mistake(str(ref)) if revision is None else None
        if local is None:
            raise
        raise DernError(f"{local}; as a Hugging Face repo id: {e}") from None


def _local_mistake(ref: str) -> str | None:
    """When `ref` (no such directory) looks like a mistyped local path, because its first part is a directory
    here: what to say first, with the names beside it that come close."""
    parent = Path(ref).expanduser().parent
    if not parent.is_dir() or parent == Path("."):
        return None
    names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    close = difflib.get_close_matches(Path(ref).name, names, n=3)
    hint = f" (did you mean {' or '.join(str(parent / n) for n in close)}?)" if close else ""
    return f"input {ref} does not exist: there is no such directory{hint}"


def check_checkpoint_ref(ref: str | os.PathLike, revision: str | None = None) -> Path | None:
    """What can be told of a checkpoint reference without the Hub: a local directory (returned, resolved), or
    None for a Hub repo id; anything else is refused in one line."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DernError(f"input {ref} is a file; give the checkpoint directory")
        if revision is not None:
            raise DernError(f"{arg('revision', revision)} is for a Hugging Face repo id; {ref} is a local directory")
        return path.resolve()
    if not REPO_ID.match(str(ref)):
        raise DernError(f"input {ref} does not exist (neither a directory nor a Hugging Face repo id)")
    return None
