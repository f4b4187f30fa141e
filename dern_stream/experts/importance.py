"""Stage 1: expert importance (Eq. 1) and the choice of experts to keep."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..families import GroupPlan


def routing_importance(
    chunks: Iterable[torch.Tensor],
    scores_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    experts: int,
) -> tuple[torch.Tensor, int]:
    """S_i = mean over tokens of [i in A(x)] G_i(x) / sum_{j in A(x)} G_j(x), with the family's own A and G:
    `scores_of(x)` gives A(x) and G(x) (experts.forward.Gating.scores). A selected index from `experts` on is a zero
    expert (LongCat-Flash): in the sum, never ranked.

    Accumulated in float64 one chunk at a time, so no more than one chunk's logits ever exist.
    Returns (S [experts] on the CPU as float64, token count).
    """
    totals, tokens = None, 0
    for x in chunks:
        idx, scores = scores_of(x)
        share = scores.double() / scores.double().sum(dim=-1, keepdim=True).clamp_min(1e-300)
        routed = idx < experts
        if totals is None:
            totals = torch.zeros(experts, dtype=torch.float64, device=share.device)
        totals.index_add_(0, idx[routed], share[routed])
        tokens += x.shape[0]
    if totals is None:
        return torch.zeros(experts, dtype=torch.float64), 0
    return (totals / tokens).cpu(), tokens


def router_norm_importance(router_weight: torch.Tensor) -> torch.Tensor:
    """Parameter-only fallback: the L2 norm of each expert's router row (weaker than routing statistics)."""
    return torch.linalg.vector_norm(router_weight.double(), dim=-1).cpu()


def top_experts(scores: torch.Tensor, count: int, candidates: list[int] | None = None) -> list[int]:
    """The `count` highest-scoring experts (ties: lower index wins), in ascending index order."""
    pool = list(range(scores.shape[0])) if candidates is None else candidates
    ranked = sorted(pool, key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:count])


def select_experts(scores: torch.Tensor, keep: int, groups: GroupPlan | None) -> list[int]:
    """Kept experts: the global top-`keep`, or the top keep/n_group of every group when groups stay balanced."""
    if groups is None or not groups.balanced:
        return top_experts(scores, keep)
    size = scores.shape[0] // groups.n_group
    per_group = keep // groups.n_group
    kept: list[int] = []
    for g in range(groups.n_group):
        kept += top_experts(scores, per_group, list(range(g * size, (g + 1) * size)))
    return kept
