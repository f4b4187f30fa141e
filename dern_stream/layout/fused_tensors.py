"""A fused layer's expert tensors as stored (plain floats, or gpt-oss's MXFP4 blocks and scales): their names and
one expert's slice of each (the conversion to floats: rewriter/layer_io.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..families import Family
from ..storage.formats import MXFP4_BLOCKS, MXFP4_GROUP, MXFP4_SCALES, ExpertStorage


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
        groups = cols // MXFP4_GROUP
        out += [FusedTensor(name + MXFP4_BLOCKS, (rows, groups, MXFP4_GROUP // 2), "U8"),
                FusedTensor(name + MXFP4_SCALES, (rows, groups), "U8")]
    return out + [FusedTensor(n, s, None) for n, s in zip(names[2:], shapes[2:], strict=True)]


