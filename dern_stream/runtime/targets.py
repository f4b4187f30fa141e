"""Where a command may write. Never onto, into or around what it was given to read (the checkpoint,
the dump, the text, the tokenizer), and `--overwrite` replaces only the command's own earlier output,
which each command recognises by its own marker (`own_output` below)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import DernError, arg
from .own_outputs import not_json_of

JSON_FILE = f"{arg('json_path')} file"  # what plan and eval call their report's path in messages


def expand_user(path: str | os.PathLike | None) -> Path | None:
    """A path as given, with `~` expanded (a shell expands it only where it is not quoted)."""
    return None if path is None else Path(path).expanduser()


def check_apart(target: Path, what: str, reads: dict[str, str | os.PathLike | None]) -> None:
    """Refuse `target` (described as `what`, e.g. "output") when it is, contains, or lies inside any of
    the paths the command reads, `reads` = {"the input checkpoint": path, ...} (None entries skipped)."""
    target = Path(target).resolve()
    for label, given in reads.items():
        if given is None:
            continue
        path = Path(given).expanduser().resolve()
        if target == path:
            raise DernError(f"{what} {target} is {label}; choose another path")
        if target in path.parents:
            raise DernError(f"{what} {target} contains {label} {path}, which is never written to or deleted; "
                            "choose another path")
        if path in target.parents:
            raise DernError(f"{what} {target} lies inside {label} {path}, which is never written to; "
                            "choose a path outside it")


def read_paths(label: str, directory: Path) -> dict[str, Path]:
    """`directory` and, for each of its files that is a symbolic link (a Hub cache snapshot, a checkpoint
    assembled from links), the file it points to: writing there would change the input too."""
    paths = {label: Path(directory)}
    for item in sorted(Path(directory).iterdir()):
        if item.is_symlink():
            paths[f"{label}'s {item.name} (a link to it)"] = item.resolve()
    return paths


def check_replaceable(target: Path, what: str, overwrite: bool, not_own: Callable[[Path], str | None],
                      directory: bool = True) -> bool:
    """May `target` be written? Returns whether something is there to replace. A missing target (or an
    empty directory) is fine; anything else needs `overwrite`, and even then only an earlier output of
    the same command: `not_own(target)` says why it is not one (None when it is). Commands check at the
    start and again just before they replace it (it may change meanwhile)."""
    target = Path(target)
    if not os.path.lexists(target):
        return False
    if target.is_symlink() and not target.exists():
        raise DernError(f"{what} {target} is a broken symbolic link; choose another path")
    if directory and not target.is_dir():
        raise DernError(f"{what} {target} exists and is not a directory")
    if not directory and not target.is_file():
        raise DernError(f"{what} {target} exists and is not a regular file")
    if directory and not any(target.iterdir()):
        return False
    if not overwrite:
        raise DernError(f"{what} {target} exists{' and is not empty' if directory else ''}; "
                        f"pass {arg('overwrite', True)} to replace it")
    reason = not_own(target)
    if reason is not None:
        raise DernError(f"{what} {target} {reason}; {arg('overwrite', True)} replaces only dern-stream's own earlier "
                        "output: "
                        "choose another path, or move it away yourself")
    return True


def is_mount_point(path: Path) -> bool:
    """A mount point cannot be renamed or replaced by a rename."""
    path = Path(path)
    return path.is_dir() and (os.path.ismount(path) or os.stat(path).st_dev != os.stat(path.parent).st_dev)


def check_json_target(path: str | os.PathLike, overwrite: bool, fmt: str, command: str,
                      reads: dict[str, str | os.PathLike | None]) -> Path:
    """A `--json FILE` target, resolved: apart from what the command reads, in an existing folder, and
    either new or (with `overwrite`) the same command's earlier report. Check again just before writing
    (`check_replaceable(path, ..., not_json_of(fmt, command), directory=False)`)."""
    path = Path(path).expanduser().resolve()
    check_apart(path, JSON_FILE, reads)
    check_replaceable(path, JSON_FILE, overwrite, not_json_of(fmt, command), directory=False)
    if not path.parent.is_dir():
        raise DernError(f"{JSON_FILE} {path}: the folder {path.parent} does not exist")
    return path
