"""Checkpoint I/O: pread reading, in-place sharded writing, staged output directories."""

from .output_dir import StagedOutput, check_free_space, check_output_location, copy_side_files, side_files_size
from .source import Checkpoint, resolve_checkpoint
from .writer import NonFiniteTensor, ShardedWriter, TensorSpec, write_durably

__all__ = [
    "Checkpoint", "NonFiniteTensor", "ShardedWriter", "StagedOutput", "TensorSpec",
    "check_free_space", "check_output_location", "copy_side_files", "resolve_checkpoint",
    "side_files_size", "write_durably",
]
