"""The one exception type users see: its message is a complete, one-line explanation."""


class DernError(Exception):
    """Bad input or an unrecoverable condition, explained in one line (the CLI prints it without traceback)."""
