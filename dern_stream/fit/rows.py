"""The rows a layer's options are fitted and judged on: inputs x and the original layer's routed output.

From the dump (the original model's inputs, evenly spaced) or from the sequential forward (the compressed
model's inputs: sequential.py). With a `holdout` share, blocks of rows spread evenly over the sample (whole
sequences for the sequential forward) are kept out of every fit and the per-layer choice is made on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib import CalibDump
from ..experts.forward import EvenSample, Gating, routed_output
from ..experts.segments import ExpertStack

BLOCK_ROWS = 256  # rows per held-out block of the dump's sample


@dataclass
class FitRows:
    x: torch.Tensor  # [T, d] float32: the layer's inputs, in token order
    target: torch.Tensor  # [T, d] float32: the original layer's routed output the fit aims at
    holdout: float = 0.0  # share of the rows kept out of fitting
    block: int = BLOCK_ROWS  # rows held out or kept together (whole sequences, for the sequential forward)

    def __post_init__(self) -> None:
        # Blocks spread over the whole sample (block j is held out when floor((j+1)s) > floor(js)): the last rows
        # alone would be the calibration text's last documents, one domain of it.
        rows = self.x.shape[0]
        block = min(self.block, max(1, rows // 64))  # at least 64 blocks, so the share is kept on small samples
        blocks = torch.arange(-(-rows // block), device=self.x.device)
        chosen = torch.floor((blocks + 1) * self.holdout) > torch.floor(blocks * self.holdout)
        mask = chosen.repeat_interleave(block)[:rows]
        self._held = mask if 0 < int(mask.sum()) < self.x.shape[0] else None

    @property
    def held(self) -> int:
        return int(self._held.sum()) if self._held is not None else 0

    def fitting(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._held is None:
            return self.x, self.target
        return self.x[~self._held], self.target[~self._held]

    def judging(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out rows, or the fitting rows when none are held out."""
        if self._held is None:
            return self.fitting()
        return self.x[self._held], self.target[self._held]


def fit_sample(dump: CalibDump, index: int, limit: int, device: torch.device) -> torch.Tensor:
    """At most `limit` of layer `index`'s cached inputs, evenly spaced, float32 on `device`."""
    sample = EvenSample(dump.layer(index).shape[0], limit)
    for _ in sample.watch(dump.chunks(index, device)):
        pass
    return sample.tensor()


def dump_rows(dump: CalibDump, index: int, limit: int, device: torch.device, router: torch.Tensor,
              bias: torch.Tensor | None, gating: Gating, experts: ExpertStack, holdout: float) -> FitRows:
    """The original model's inputs from the dump, and the original layer's output on them."""
    x = fit_sample(dump, index, limit, device)
    return FitRows(x, routed_output(x, router, bias, gating, experts), holdout)
