"""One layer's ranking (decided by the plan) and what its rewrite did (audited in dern_stream.json)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..experts.result import LayerResult

ROUTING, ROUTER_NORM, NOT_NEEDED = "routing", "router-norm", "not needed"  # LayerSelection.source


@dataclass(frozen=True)
class LayerSelection:
    """How a layer's experts were ranked (by the plan), and which it keeps.

    `source`: "routing" (Eq. 1 over `tokens` cached inputs), "router-norm" (no cached inputs), or "not
    needed" (every expert kept and nothing rebuilt: no ranking is computed). `kept` is None for the
    baselines that choose from the layer's outputs (reap, msmoe, hcsmoe): decided when the layer runs."""

    scores: torch.Tensor | None  # [N] float64, on the CPU
    tokens: int
    source: str
    kept: list[int] | None


@dataclass
class LayerReport:
    index: int
    importance: list[float]
    importance_source: str  # LayerSelection.source
    tokens: int
    result: LayerResult
    # Output-error bookkeeping when the options use the cached inputs (choice, refit), else empty.
    fit: dict = field(default_factory=dict)
    requantization_error: float | None = None  # FP8: ||deq(q(W)) - W|| / ||W|| over the rebuilt experts
