"""Reading a tensor as the model uses it, whatever its storage."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..errors import DernError
from .formats import SCALE_SUFFIX, expert_storage
from .fp8_blocks import dequantize


def is_scaled_fp8(ckpt: Checkpoint, name: str) -> bool:
    """An FP8 weight stored with its block scales (`name` + `_scale_inv`)."""
    return ckpt.entries[name].dtype == "F8_E4M3" and name + SCALE_SUFFIX in ckpt.entries


def is_fp8_scale(ckpt: Checkpoint, name: str) -> bool:
    """The block scales of an FP8 weight."""
    return name.endswith(SCALE_SUFFIX) and ckpt.entries.get(name[:-len(SCALE_SUFFIX)]) is not None \
        and is_scaled_fp8(ckpt, name[:-len(SCALE_SUFFIX)])


def load_weight(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A tensor as the model uses it: FP8 weights with block scales dequantized (float32), others as stored."""
    if is_scaled_fp8(ckpt, name):
        block = expert_storage(ckpt.config).block
        if block is None:
            raise DernError(f"{name} is FP8 with block scales, but config.json has no FP8 quantization_config")
        return dequantize(ckpt.load(name), ckpt.load(name + SCALE_SUFFIX), block)
    return ckpt.load(name)
