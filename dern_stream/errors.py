"""The one exception type users see: its message is a complete, one-line explanation."""

import os
from collections.abc import Iterator
from contextlib import contextmanager


class DernError(Exception):
    """Bad input or an unrecoverable condition, explained in one line (the CLI prints it without traceback)."""


class NonFinite(DernError):
    """Values came out NaN or Inf (from the input's weights, or beyond the stored dtype): running the
    same command again meets them again, so no resume is offered."""


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """OSErrors raised inside name `path`, the file being written: a full disk is the output's, not
    whichever input the failing call (a copy, say) would name."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def describe(e: BaseException) -> str:
    """One line for a DernError or an OSError (a full disk, a permission problem)."""
    if isinstance(e, OSError) and not isinstance(e, DernError):
        return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    return str(e)
