"""Whether a quantized weight's values are finite once dequantized, as loaders dequantize them (to bf16): an FP8
weight times its block scales, MXFP4 values times their power-of-two scales. Every stored byte can be finite while
the products are not (a block scale of 3e38; an E8M0 scale byte of 255, or of 254 under a value of 2 or more).

The scales alone settle the common case: an FP8 value is at most 448 and an E2M1 value at most 6, so scales below
the bf16 range divided by those cannot overflow, and the weight itself is read only where a scale is that large.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import mxfp4
from .formats import MXFP4_BLOCKS, MXFP4_SCALES, NVFP4, SCALE_SUFFIX, CompressedWeights, expert_storage
from .fp8_blocks import FP8_MAX, dequantize
from .tensor_kinds import compressed_parts, is_mxfp4, is_scaled_fp8

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

LIMIT = float(torch.finfo(torch.bfloat16).max)  # what the loaders dequantize to: the narrower range of bf16, f32
_E8M0_BIAS, _E2M1_MAX = 127, 6.0
# The largest MXFP4 scale byte under which no E2M1 value can overflow: 6 x 2^(252 - 127) < LIMIT.
_MXFP4_SAFE = 252


def dequantized_problem(ckpt: Checkpoint, name: str) -> str | None:
    """Why the quantized weight `name` of `ckpt` (an FP8 weight with block scales, or an MXFP4 weight stored as
    `name_blocks` and `name_scales`) is not finite once dequantized; None when it is, or is not quantized."""
    compressed = compressed_parts(ckpt, _module_weight(ckpt, name))
    if compressed is not None:
        return compressed_problem(ckpt, *compressed, name)
    if name in ckpt.entries and is_scaled_fp8(ckpt, name):
        scale = ckpt.load(name + SCALE_SUFFIX).float()
        return fp8_problem(lambda: ckpt.load(name), scale, expert_storage(ckpt.config).block, name)
    if is_mxfp4(ckpt, name):
        return mxfp4_problem(ckpt.load(name + MXFP4_BLOCKS), ckpt.load(name + MXFP4_SCALES), name)
    return None


def fp8_problem(weight, scale: torch.Tensor, block: tuple[int, int], name: str) -> str | None:
    """`weight()` gives the FP8 weight (read only where the scales could make a value overflow)."""
    if not bool(torch.isfinite(scale).all()):
        return f"{name}{SCALE_SUFFIX} holds NaN or Inf"
    largest = float(scale.abs().max()) if scale.numel() else 0.0
    if largest * FP8_MAX <= LIMIT:
        return None
    values = dequantize(weight(), scale, block).to(torch.bfloat16)
    if bool(torch.isfinite(values).all()):
        return None
    return f"{name} dequantizes to NaN or Inf (its block scales reach {largest:.3g})"


def mxfp4_problem(blocks: torch.Tensor, scales: torch.Tensor, name: str) -> str | None:
    """MXFP4 `blocks` [..., groups, 16] and their scale bytes [..., groups]."""
    largest = int(scales.max()) if scales.numel() else 0
    if largest <= _MXFP4_SAFE:
        return None
    if largest < 255 and bool(torch.isfinite(mxfp4.dequantize(blocks, scales).to(torch.bfloat16)).all()):
        return None
    what = "a scale byte of 255 (NaN)" if largest == 255 else f"scales up to 2^{largest - _E8M0_BIAS}"
    return f"{name} dequantizes to NaN or Inf ({what})"


def _module_weight(ckpt: Checkpoint, name: str) -> str:
    """The weight a compressed-tensors tensor stands for (`...proj.weight_packed` -> `...proj.weight`); the name
    itself otherwise. Only the first stored tensor of a weight stands for it, so that a weight is checked once."""
    fmt = expert_storage(ckpt.config).compressed
    if fmt is not None and fmt.params[0] != "weight" and name.endswith("." + fmt.params[0]):
        return name[:-len(fmt.params[0])] + "weight"
    return name


def compressed_problem(ckpt: Checkpoint, fmt: CompressedWeights, parts: dict[str, str], name: str) -> str | None:
    """A compressed-tensors weight: its scales finite, and small enough that no quantized value (under 2^bits for
    integers, with a zero point or not; 448 for FP8) can overflow; else its dequantized values are read and checked."""
    scale = ckpt.load(parts["weight_scale"]).float()
    if not bool(torch.isfinite(scale).all()):
        return f"{parts['weight_scale']} holds NaN or Inf"
    largest = float(scale.abs().max()) if scale.numel() else 0.0
    if fmt.format != NVFP4 and largest * (FP8_MAX if fmt.type == "float" else 2 ** fmt.num_bits) <= LIMIT:
        return None  # (NVFP4's values are also divided by a global scale: read them)
    from .compressed_tensors import decompress  # (the library: seconds to import, only where the values are read)

    values = decompress(fmt, {p: ckpt.load(stored) for p, stored in parts.items()}).to(torch.bfloat16)
    if bool(torch.isfinite(values).all()):
        return None
    return f"{name} dequantizes to NaN or Inf (its scales reach {largest:.3g})"
