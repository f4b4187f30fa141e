"""Shared fixtures: tiny real checkpoints built with transformers' own classes, cached per session."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dern_stream.checkpoint import Checkpoint
from dern_stream.tiny_models import FAMILY_CONFIGS, build_example

FAMILIES = sorted(FAMILY_CONFIGS)


@dataclass
class Built:
    model_dir: Path
    calib: Path

    @property
    def config(self) -> dict:
        return json.loads((self.model_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """build(family, **kwargs) -> Built, each distinct request built once per session."""
    cache: dict = {}

    def _build(family: str, **kwargs) -> Built:
        key = (family, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(family)
            cache[key] = Built(*build_example(directory, family, **kwargs))
        return cache[key]

    return _build


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (tests only: tiny checkpoints)."""
    ckpt = Checkpoint(directory)
    return {name: ckpt.load(name) for name in ckpt.entries}


def raw_bytes(directory: Path) -> dict[str, bytes]:
    """Every tensor's stored bytes, read by offset (what 'byte for byte' means)."""
    out = {}
    for name, e in Checkpoint(directory).entries.items():
        with open(e.file, "rb") as f:
            f.seek(e.start)
            out[name] = f.read(e.nbytes)
    return out


def shard_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path (tiny checkpoints): 'untouched' means all of these."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


DELETE = object()  # edited_copy: remove the key


def edited_copy(model_dir: Path, dest: Path, **changes) -> Path:
    """A copy of checkpoint `model_dir` at `dest` whose config.json has `changes` (DELETE removes a key)."""
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def cli_without(module: str, *args) -> subprocess.CompletedProcess:
    """`dern-stream ARGS` in a new process where importing `module` fails, as if it were not installed."""
    code = (f"import sys; sys.modules[{module!r}] = None; from dern_stream.cli import main; "
            "sys.argv = ['dern-stream'] + sys.argv[1:]; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def assert_clean_failure(result, out: Path, message: str, code: int = 2) -> None:
    """One line on stderr (after any progress bars), the exit code, no traceback, OUT not created, and
    nothing complete-looking beside it: a kept partial output must be a resumable hidden directory
    with no config.json, and the message must say how to resume."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    for left in [p for p in out.parent.iterdir() if ".dern-" in p.name and p.name.startswith(f".{out.name}.")]:
        assert left.name == f".{out.name}.dern-partial" and (left / ".dern-progress.json").is_file(), left
        assert not (left / "config.json").exists()
        assert "again to resume" in lines[-1]
