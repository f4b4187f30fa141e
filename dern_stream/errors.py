"""The one exception type users see: its message is a complete, one-line explanation."""


class DernError(Exception):
    """Bad input or an unrecoverable condition, explained in one line (the CLI prints it without traceback)."""


class NonFinite(DernError):
    """Values came out NaN or Inf (from the input's weights, or beyond the stored dtype): running the
    same command again meets them again, so no resume is offered."""


def describe(e: BaseException) -> str:
    """One line for a DernError or an OSError (a full disk, a permission problem)."""
    if isinstance(e, OSError) and not isinstance(e, DernError):
        return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    return str(e)
