"""`verify`'s checks that need no tensors, torch-free: the command line runs them before torch loads, and
`verify` starts with them."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.locate import check_checkpoint_ref
from ..errors import DernError


def check_verify_arguments(out, against, revision: str | None) -> Path:
    """`verify`'s arguments; returns OUT resolved."""
    root = Path(out).expanduser().resolve()
    if not root.is_dir():
        raise DernError(f"{root} is not a directory")
    if against is not None:
        check_checkpoint_ref(against, revision)
    return root
