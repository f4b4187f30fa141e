"""FP8 E4M3 weights with one scale per block of rows x cols (DeepSeek-V3 style `weight_scale_inv`).

W = W_fp8 * scale, the scale broadcast over its block (despite its name, the `_inv` scale multiplies).
Edge blocks may be partial. Math only: no I/O.
"""

from __future__ import annotations

import torch

from .formats import scale_shape

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def _spread(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The per-block scale as one value per weight, [..., rows, cols], float32."""
    full = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :shape[0], :shape[1]]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 [..., rows, cols] from FP8 weights [..., rows, cols] and their block scales (on the weight's
    device); leading dimensions (a stack of experts) pair weight i with scale i."""
    rows_cols = tuple(weight.shape[-2:])
    if tuple(scale.shape) != (*weight.shape[:-2], *scale_shape(rows_cols, block)):
        raise ValueError(f"scale shape {list(scale.shape)} does not fit weight {list(weight.shape)} in {block} blocks")
    return weight.float() * _spread(scale, rows_cols, block)


def dequantize_vectors(weight: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """float32 [n, length] from n FP8 vectors (each a row or column of some block-scaled weight) and their
    scales [n, ceil(length / block)], one scale per `block` consecutive values along the vector."""
    return weight.float() * scale.float().repeat_interleave(block, dim=-1)[..., :weight.shape[-1]]


def quantize(weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32,
             pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, block scales in `scale_dtype`) with each block's largest magnitude mapped to 448, as
    DeepSeek's own `weight_quant` does; with `pow2_scales` (UE8M0 scales) each scale is rounded up to a
    power of two, so the largest magnitude maps to 448 or less."""
    w = weight.float()
    rows, cols = w.shape
    grid = scale_shape((rows, cols), block)
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.abs()
    amax = padded.view(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block: any scale, use 1
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(scale_dtype)
    q = (w / _spread(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale
