"""Advisory locks on the directories dern-stream writes (and the dumps it reads).

A writer holds an exclusive lock on the directory itself (flock on a descriptor of the directory) for
as long as it writes; a reader of a dump holds a shared one, so `dump --overwrite` cannot replace a
dump that a rewrite is reading. Locking the directory rather than a file in it adds nothing to the
user's directories (a dump made by any version can be locked, even on a read-only disk), and the
lock follows the directory when it is renamed. The kernel drops a lock when its process dies, so a
killed run never leaves a stale lock behind. A writer never deletes a directory it locks, only
empties it, so that a second run cannot lock a new directory of the same name meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from ..errors import DernError

_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


def empty_in_place(directory: Path) -> None:
    """Delete everything in a directory this process has locked, but not the directory (see above)."""
    for item in Path(directory).iterdir():
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


class DirLock:
    """`with DirLock(directory, busy_message):` holds `directory` exclusively (shared=False) or shared;
    raises DernError(busy_message) at once, without waiting, when another process holds it. Where the
    filesystem cannot lock a directory (some network filesystems), nothing is locked."""

    def __init__(self, directory: Path, busy: str, shared: bool = False):
        self.path = Path(directory)
        self.fd: int | None = None
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise DernError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            self.release()
            if e.errno in _BUSY:
                raise DernError(busy) from None
            return  # the filesystem does not lock directories: run unlocked, as before locks existed
        # Renamed or replaced between the open and the lock (a finished rewrite renames its directory):
        # a lock on a directory no longer at `path` excludes nobody.
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except OSError:
            moved = True
        if moved:
            self.release()
            raise DernError(busy)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reading_dump(dump: Path) -> DirLock:
    """The shared lock a rewrite or an eval holds on the dump it reads."""
    return DirLock(dump, f"calibration dump {dump} is being written by a dern-stream dump right now", shared=True)
