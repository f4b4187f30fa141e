"""MXFP4 (OCP microscaling FP4, as gpt-oss ships its experts): groups of 32 values along the last axis, each
an E2M1 number (two per byte, the even element in the low nibble) times the group's power-of-two scale
(an E8M0 byte: 2^(byte - 127)). `*_blocks` hold the bytes [..., groups, 16], `*_scales` [..., groups].
Math only: no I/O.
"""

from __future__ import annotations

import torch

from .formats import MXFP4_GROUP as GROUP

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of nibbles 0-7; bit 3 is the sign
_MAX = E2M1[-1]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., groups * 32] from blocks [..., groups, 16] (uint8) and scales [..., groups] (uint8)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)}")
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.uint8)
    values = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.flatten(-2)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of `weight` [..., C] (C a multiple of 32): each group's scale is the smallest power of
    two that brings its largest magnitude within 6, and each value rounds to the nearest E2M1 number."""
    w = weight.float()
    if w.shape[-1] % GROUP:
        raise ValueError(f"MXFP4 needs the last axis to be a multiple of {GROUP}, got {w.shape[-1]}")
    groups = w.unflatten(-1, (w.shape[-1] // GROUP, GROUP))
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / _MAX)), torch.zeros_like(amax))
    exponent = exponent.clamp(-127, 127)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    magnitudes = torch.tensor(E2M1, device=w.device)
    nibble = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # nearest magnitude (ties: lower)
    nibble = nibble | ((scaled < 0) & (nibble > 0)).long() << 3
    pairs = nibble.to(torch.uint8).unflatten(-1, (GROUP // 2, 2))
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (exponent + 127).to(torch.uint8)
