"""Checkpoint I/O: pread reading, in-place sharded writing, staged output directories.

The names load their modules on first use (PEP 562): the command line checks paths (output_dir,
locate) without loading torch, which the reader and the writer need."""

from __future__ import annotations

from ..runtime.lazy_exports import lazy_exports

_EXPORTS = {
    "StagedOutput": ".output_dir", "check_free_space": ".output_dir", "check_output_location": ".output_dir",
    "copy_side_files": ".output_dir", "side_files_size": ".output_dir",
    "resolve_checkpoint": ".locate",
    "Checkpoint": ".source",
    "NonFiniteTensor": ".writer", "ShardedWriter": ".writer", "TensorSpec": ".safetensors_format",
    "write_durably": "..runtime.durable_files",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
