"""Advisory locks on the directories dern-stream writes (and the dumps it reads).

A writer holds an exclusive lock on a `.dern-lock` file inside the directory for as long as it
writes; a reader of a dump holds a shared one, so `dump --overwrite` cannot replace a dump that a
rewrite is reading. The kernel drops a lock when its process dies, so a killed run never leaves a
stale lock behind. Lock files are never deleted while a run may still hold them: a lock on an
unlinked file would no longer exclude a second run that creates a new one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import DernError

LOCK_NAME = ".dern-lock"


class DirLock:
    """`with DirLock(directory, busy_message):` holds `directory/.dern-lock` exclusively (shared=False)
    or shared; raises DernError(busy_message) at once, without waiting, when another process holds it."""

    def __init__(self, directory: Path, busy: str, shared: bool = False):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None
        try:
            # A shared lock needs no write access: a dump on a read-only disk can still be read.
            self.fd = os.open(self.path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if shared:  # no lock file (a dump made before locks) or no way to read it: nothing to share
                return
            raise DernError(f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            # The holder may have removed or moved the file just before letting go (a finished rewrite
            # renames its directory): a lock on a file no longer at `path` excludes nobody.
            if os.stat(self.path).st_ino != os.fstat(self.fd).st_ino:
                raise OSError
        except OSError:
            self.release()
            raise DernError(busy) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
