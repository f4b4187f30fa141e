"""A fused layer's expert tensors as stored (plain floats, or gpt-oss's MXFP4 blocks and scales), and the
conversion between one expert's stored slices and the family's float layout (FusedExperts.split/join)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import Family
from ..storage import ExpertStorage, mxfp4


@dataclass(frozen=True)
class FusedTensor:
    name: str
    slice_shape: tuple[int, ...]  # one expert's
    dtype: str | None  # None: the experts' float dtype


def fused_tensors(family: Family, layer: int, hidden: int, intermediate: int,
                  storage: ExpertStorage) -> list[FusedTensor]:
    """The stored tensors of a fused layer, in a fixed order (see to_float/from_float)."""
    names, shapes = family.fused_names(layer), family.fused.shapes(hidden, intermediate)
    if not storage.mxfp4:
        return [FusedTensor(n, s, None) for n, s in zip(names, shapes, strict=True)]
    # MXFP4 holds the projections transposed, [rows, cols] grouped along cols: gate_up [2h, d], down [d, h].
    out = []
    for name, (rows_cols) in zip(names[:2], ((2 * intermediate, hidden), (hidden, intermediate)), strict=True):
        rows, cols = rows_cols
        groups = cols // mxfp4.GROUP
        out += [FusedTensor(name + mxfp4.BLOCKS, (rows, groups, mxfp4.GROUP // 2), "U8"),
                FusedTensor(name + mxfp4.SCALES, (rows, groups), "U8")]
    return out + [FusedTensor(n, s, None) for n, s in zip(names[2:], shapes[2:], strict=True)]


def to_float(slices: list[torch.Tensor], storage: ExpertStorage) -> list[torch.Tensor]:
    """One expert's stored slices -> its slices in the family's float layout (FusedExperts.split's input)."""
    if not storage.mxfp4:
        return slices
    gate_up = mxfp4.dequantize(slices[0], slices[1]).T
    down = mxfp4.dequantize(slices[2], slices[3]).T
    return [gate_up, down, *slices[4:]]


def from_float(slices: list[torch.Tensor], storage: ExpertStorage) -> list[torch.Tensor]:
    """to_float's inverse (MXFP4: quantized again)."""
    if not storage.mxfp4:
        return slices
    gate_up, down = mxfp4.quantize(slices[0].T), mxfp4.quantize(slices[1].T)
    return [*gate_up, *down, *slices[2:]]
