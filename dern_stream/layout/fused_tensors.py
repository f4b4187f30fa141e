"""A fused layer's expert tensors as stored (plain floats, or gpt-oss's MXFP4 blocks and scales): their names, one
expert's slice of each, and where that slice lies (the conversion to floats: rewriter/layer_io.py).

An expert's slice is entry e of the leading dimension, [N, *slice]; or, where the family stores the expert dimension
flattened into the next (DBRX's [N * h, d]), rows e * h to (e + 1) * h: the same bytes either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..families import Family
from ..storage.formats import MXFP4_BLOCKS, MXFP4_GROUP, MXFP4_SCALES, ExpertStorage

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint


@dataclass(frozen=True)
class FusedTensor:
    name: str
    slice_shape: tuple[int, ...]  # one expert's
    dtype: str | None  # None: the experts' float dtype
    flat: bool = False  # stored [N * rows, cols] (FusedExperts.flat)

    def stored_shape(self, experts: int) -> tuple[int, ...]:
        """The tensor's shape on disk for `experts` experts."""
        if self.flat:
            return (experts * self.slice_shape[0], *self.slice_shape[1:])
        return (experts, *self.slice_shape)

    def read_expert(self, ckpt: Checkpoint, expert: int, out: torch.Tensor) -> None:
        """Expert `expert`'s slice into `out` (contiguous, one expert's slice, the stored dtype): one pread."""
        if self.flat:
            ckpt.read_rows_into(self.name, expert * out.shape[0], out)
        else:
            ckpt.read_rows_into(self.name, expert, out.unsqueeze(0))

    def experts_view(self, tensor: torch.Tensor, experts: int) -> torch.Tensor:
        """A tensor of `experts` experts as stored, as [experts, *slice] (a view: the same bytes)."""
        return tensor.view(experts, -1, *tensor.shape[1:]) if self.flat else tensor


def fused_tensors(family: Family, layer: int, hidden: int, intermediate: int,
                  storage: ExpertStorage) -> list[FusedTensor]:
    """The stored tensors of a fused layer, in a fixed order (see to_float/from_float)."""
    names, shapes = family.fused_names(layer), family.fused.shapes(hidden, intermediate)
    if not storage.mxfp4:
        return [FusedTensor(n, s, None, family.fused.flat) for n, s in zip(names, shapes, strict=True)]
    # MXFP4 holds the projections transposed, [rows, cols] grouped along cols: gate_up [2h, d], down [d, h].
    out = []
    for name, (rows_cols) in zip(names[:2], ((2 * intermediate, hidden), (hidden, intermediate)), strict=True):
        rows, cols = rows_cols
        groups = cols // MXFP4_GROUP
        out += [FusedTensor(name + MXFP4_BLOCKS, (rows, groups, MXFP4_GROUP // 2), "U8"),
                FusedTensor(name + MXFP4_SCALES, (rows, groups), "U8")]
    return out + [FusedTensor(n, s, None) for n, s in zip(names[2:], shapes[2:], strict=True)]


