"""Reading a tensor as the model uses it, whatever its storage."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..errors import DernError
from . import mxfp4
from .formats import MXFP4_BLOCKS, MXFP4_SCALES, SCALE_SUFFIX, expert_storage
from .fp8_blocks import dequantize
from .tensor_kinds import check_scales, compressed_parts, is_mxfp4, is_scaled_fp8


def load_weight(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A tensor as the model uses it: FP8 weights with block scales, MXFP4 experts and compressed-tensors weights
    dequantized (float32), others as stored."""
    compressed = compressed_parts(ckpt, name)
    if compressed is not None:
        from .compressed_tensors import decompress

        fmt, parts = compressed
        return decompress(fmt, {p: ckpt.load(stored) for p, stored in parts.items()})
    if is_mxfp4(ckpt, name):  # the blocks hold the transposed projection: [N, rows, groups, 16]
        return mxfp4.dequantize(ckpt.load(name + MXFP4_BLOCKS), ckpt.load(name + MXFP4_SCALES)).transpose(1, 2)
    if is_scaled_fp8(ckpt, name):
        block = expert_storage(ckpt.config).block
        if block is None:
            raise DernError(f"{name} is FP8 with block scales, but config.json has no FP8 quantization_config")
        check_scales(ckpt, name, block)
        return dequantize(ckpt.load(name), ckpt.load(name + SCALE_SUFFIX), block)
    if ckpt.entries[name].dtype.startswith("F8"):
        raise DernError(f"{name} is stored as {ckpt.entries[name].dtype} without block scales ({name}{SCALE_SUFFIX}); "
                        "its values cannot be read")
    return ckpt.load(name)


