"""`verify`'s checks that need no tensors, torch-free: the command line runs them before torch loads, and
`verify` starts with them."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from ..checkpoint.locate import check_checkpoint_ref
from ..errors import DernError
from ..families import family_for


def check_verify_arguments(out, against, revision: str | None) -> Path:
    """`verify`'s arguments; returns OUT resolved."""
    root = Path(out).expanduser().resolve()
    if not root.is_dir():
        raise DernError(f"{root} is not a directory")
    if against is not None:
        check_checkpoint_ref(against, revision)
    family_for(Checkpoint(root).config)  # a checkpoint too broken to open, or not of a family, is refused at once
    return root
