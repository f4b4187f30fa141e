"""Where a checkpoint is: a local directory, or a Hub repo id fetched into huggingface_hub's cache. No torch
here: the command line's refusals use it before anything heavy loads."""

from __future__ import annotations

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

    return download(str(ref), revision)


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
