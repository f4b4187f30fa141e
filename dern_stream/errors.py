"""The one exception type users see: its message is a complete, one-line explanation.

A message names an argument with `arg(name, value)` (the Python API's keyword): Python callers read
it as `overwrite=True`, the command line (cli.py) as `--overwrite`. The message keeps the argument as
written until it is shown, so it is worded once for both."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# Private-use characters around an argument in a message; what lies between them is JSON (ASCII only, so
# never these characters).
_OPEN, _CLOSE = "\ue000", "\ue001"
_ARGUMENT = re.compile(f"{_OPEN}(.*?){_CLOSE}")
_UNSET = object()


def arg(name: str, value: object = _UNSET, *, metavar: str | None = None) -> str:
    """Argument `name` (the Python keyword) as a message names it, with `value` if given: `name=value` for
    Python callers, `--name value` on the command line (`metavar` stands for the value there only)."""
    given = [] if value is _UNSET else [value if not isinstance(value, tuple) else list(value)]
    return _OPEN + json.dumps([name, metavar, *given], default=str) + _CLOSE  # (a path: as its text)


def render(message: str, flags: Mapping[str, str] | None = None) -> str:
    """`message` with its arguments as Python keywords, or, given `flags` (keyword -> flag, from the
    command line's options), as command-line flags; a keyword missing from `flags` is `--keyword`."""
    def one(match: re.Match) -> str:
        name, metavar, *given = json.loads(match.group(1))
        if flags is None:
            return name if not given else f"{name}={given[0]!r}"
        flag = flags.get(name) or "--" + name.replace("_", "-")
        if not given:
            return flag if metavar is None else f"{flag} {metavar}"
        value = given[0]
        if isinstance(value, bool):
            return flag if value else "--no-" + flag.removeprefix("--")
        return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"
    return _ARGUMENT.sub(one, message)


class DernError(Exception):
    """Bad input or an unrecoverable condition, explained in one line (the CLI prints it without traceback).
    str() names arguments as the Python API does; describe() keeps them for the command line to name."""

    def __str__(self) -> str:
        return render(super().__str__())


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
    """One line for a DernError or an OSError (a full disk, a permission problem). A DernError's arguments
    stay unnamed (see `arg`): wrapped into another DernError, or passed to `render`."""
    if isinstance(e, OSError) and not isinstance(e, DernError):
        return f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    if isinstance(e, DernError):
        return Exception.__str__(e)
    return str(e)
