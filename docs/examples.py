"""The command outputs the docs show, made by running the commands on the demo that README.md's set-up builds.

    python docs/examples.py           # runs them and writes their output into the docs
    python docs/examples.py --check   # exits 1, with a diff, when a page shows other output than the commands give

A page marks an example with `<!-- example: NAME -->` on the line before its fenced block; the block is the command
and what it printed, the temporary folder the demo was built in written as /home/me/dern-stream.
tests/test_doc_examples.py runs the check.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SHOWN_ROOT = "/home/me/dern-stream"
# README.md's set-up, as it builds the demo (the examples run where it would).
SETUP = [
    ["-m", "dern_stream.tiny_models", "demo"],
    ["-m", "dern_stream.cli", "dump", "demo/model", "demo/calib.zarr", "--text", "demo/corpus.txt", "--num-tokens",
     "8192", "--seq-len", "128", "--quiet"],
]
EXAMPLES = {
    "plan": ["plan", "demo/model", "--experts", "4", "--calib", "demo/calib.zarr", "-q"],
}
MARKER = re.compile(r"^<!-- example: (\w+) -->\n```\n.*?^```\n", re.M | re.S)


def run_examples() -> dict[str, str]:
    """Each example's block: its command line, then what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for args in SETUP:
            subprocess.run([sys.executable, *args], cwd=tmp, env=env, check=True, capture_output=True)
        out = {}
        for name, args in EXAMPLES.items():
            done = subprocess.run([sys.executable, "-m", "dern_stream.cli", *args], cwd=tmp, env=env, check=True,
                                  capture_output=True, text=True)
            shown = done.stdout.replace(str(Path(tmp).resolve()), SHOWN_ROOT)
            out[name] = f"$ dern-stream {' '.join(args)}\n{shown}"
        return out


def rendered(pages: dict[Path, str], examples: dict[str, str]) -> dict[Path, str]:
    def block(match: re.Match) -> str:
        name = match.group(1)
        if name not in examples:
            raise SystemExit(f"no example named {name!r} (docs/examples.py: EXAMPLES)")
        return f"<!-- example: {name} -->\n```\n{examples[name]}```\n"
    return {path: MARKER.sub(block, text) for path, text in pages.items()}


def main() -> None:
    pages = {path: path.read_text() for path in sorted([DOCS.parent / "README.md", *DOCS.glob("*.md")])}
    pages = {path: text for path, text in pages.items() if MARKER.search(text)}
    new = rendered(pages, run_examples())
    changed = [path for path in pages if new[path] != pages[path]]
    if "--check" not in sys.argv[1:]:
        for path in changed:
            path.write_text(new[path])
            print(f"wrote {path}")
        return
    for path in changed:
        sys.stdout.writelines(difflib.unified_diff(pages[path].splitlines(True), new[path].splitlines(True),
                                                   str(path), "the commands' output"))
    if changed:
        print("the docs show other output than the commands give: run python docs/examples.py", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
