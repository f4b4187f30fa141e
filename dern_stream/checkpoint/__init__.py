"""Checkpoint I/O: pread reading, in-place sharded writing, staged output directories.

The names load their modules on first use (PEP 562): the command line checks paths (output_dir,
locate) without loading torch, which the reader and the writer need."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "StagedOutput": ".output_dir", "check_free_space": ".output_dir", "check_output_location": ".output_dir",
    "copy_side_files": ".output_dir", "side_files_size": ".output_dir",
    "resolve_checkpoint": ".locate",
    "Checkpoint": ".source",
    "NonFiniteTensor": ".writer", "ShardedWriter": ".writer", "TensorSpec": ".writer",
    "write_durably": "..durable_files",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dern_stream.checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
