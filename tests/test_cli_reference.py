"""docs/cli.md is the commands' own --help (docs/cli_reference.py renders it): it cannot drift from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "cli_reference.py"


def test_docs_cli_md_is_what_help_prints():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
