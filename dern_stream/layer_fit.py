"""The rows a layer's options are fitted and judged on: inputs x and the original layer's routed output.

From the dump (the original model's inputs, evenly spaced) or from the sequential forward (the compressed
model's inputs: sequential.py). With a `holdout` share, the last rows (the latest tokens: whole sequences
or nearly) are kept out of every fit and the per-layer choice is made on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .calib import CalibDump
from .methods.moe_forward import EvenSample, Gating, routed_output
from .methods.segments import ExpertStack


@dataclass
class FitRows:
    x: torch.Tensor  # [T, d] float32: the layer's inputs
    target: torch.Tensor  # [T, d] float32: the original layer's routed output the fit aims at
    holdout: float = 0.0  # share of the rows (the last ones) kept out of fitting

    @property
    def held(self) -> int:
        return math.floor(self.holdout * self.x.shape[0]) if self.x.shape[0] > 1 else 0

    def fitting(self) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.x.shape[0] - self.held
        return self.x[:end], self.target[:end]

    def judging(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out rows, or the fitting rows when none are held out."""
        if not self.held:
            return self.fitting()
        return self.x[-self.held:], self.target[-self.held:]


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
