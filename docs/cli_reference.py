"""docs/cli.md, generated from the command line itself: every command's --help, as click prints it.

    python docs/cli_reference.py           # writes docs/cli.md
    python docs/cli_reference.py --check   # exits 1, with a diff, when docs/cli.md differs from --help

tests/test_cli_reference.py runs the check, so the page cannot drift from the commands.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import click

from dern_stream.cli import main

PAGE = Path(__file__).resolve().parent / "cli.md"
WIDTH = 110  # the help text's width: fixed, so the page does not depend on the terminal it was made in

INTRO = """\
# Command line reference

Generated from the commands' own `--help` by `python docs/cli_reference.py` (a test fails when this page and
`--help` differ). What the commands do and how to read their output: [the README](../README.md) and the other
pages in [docs/](.). The Python functions (`dern_stream.rewrite`, `plan`, `dump`, `evaluate`...) take
the same options as keyword arguments, dashes as underscores (`--quiet` is `progress=False`; each function's
docstring says where a name differs).

Bad input of any kind ends in one `error:` line on stderr and exit status 2; `dern-stream --debug COMMAND ...`
shows the traceback instead.
"""


def _help(command: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH)
    return command.get_help(ctx)


def render() -> str:
    """The page: the group's help, then each command's, in the order --help lists them."""
    root = click.Context(main, info_name="dern-stream", terminal_width=WIDTH, max_content_width=WIDTH)
    parts = [INTRO, "## dern-stream\n", "```\n" + _help(main, "dern-stream", None) + "\n```\n"]
    for name in main.list_commands(root):
        parts += [f"## dern-stream {name}\n", "```\n" + _help(main.get_command(root, name), name, root) + "\n```\n"]
    return "\n".join(parts)


def main_() -> None:
    text = render()
    if "--check" not in sys.argv[1:]:
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
        return
    current = PAGE.read_text() if PAGE.is_file() else ""
    if current != text:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   "docs/cli.md", "--help"))
        print("docs/cli.md differs from the commands' --help: run python docs/cli_reference.py", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main_()
