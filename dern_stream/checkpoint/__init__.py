"""Checkpoint I/O: pread reading, in-place sharded writing, staged output directories."""

from .output_dir import StagedOutput, check_output_location, copy_side_files
from .source import Checkpoint, resolve_checkpoint
from .writer import ShardedWriter, TensorSpec

__all__ = [
    "Checkpoint", "ShardedWriter", "StagedOutput", "TensorSpec",
    "check_output_location", "copy_side_files", "resolve_checkpoint",
]
