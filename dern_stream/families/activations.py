"""Expert activations other than act(gate) * up (family records name them; torch is imported where they run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss: gate clamped above at `limit`, up to +-limit, then gate * sigmoid(alpha * gate) * (up + 1)."""

    alpha: float
    limit: float

    def __call__(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        import torch

        g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return g * torch.sigmoid(g * self.alpha) * (u + 1)
