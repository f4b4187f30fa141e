"""What a method makes of one layer: the kept experts (rebuilt, or unchanged), their router rows, and what moved
where; the kept experts as one stack, and refitted projections taken back into the result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..families import PARTS, Family
from .segments import ExpertStack, transfer_router


@dataclass
class RebuiltExpert:
    """A kept expert's new weights, in the checkpoint's dtype: gate and up [k, d], down [d, k] (views,
    possibly strided); `bias` [k, 2], each neuron's gate and up bias, where the family has them."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None  # [d] for a merged expert (baselines); None keeps the kept expert's


@dataclass
class LayerResult:
    kept: list[int]
    router: torch.Tensor  # [K, d] in the router's stored dtype
    # One entry per kept expert: new weights, or None where the expert is written unchanged.
    experts: list[RebuiltExpert | None]
    counts: torch.Tensor  # [len(dropped), K] segments moved from each dropped to each kept expert
    dropped: list[int] = field(default_factory=list)
    kmeans_iterations: list[int] = field(default_factory=list)
    router_transferred: bool = False  # Eq. 8 applied (a router bias in the logits then follows it too)
    # For the report: pooled segments per bin of their best similarity (SIMILARITY_BINS over [-1, 1]),
    # and [members, clusters with that many] over the rebuilt experts' k-means clusters.
    similarity_histogram: list[int] = field(default_factory=list)
    cluster_sizes: list[list[int]] = field(default_factory=list)

    @property
    def segments_reassigned(self) -> int:
        return int(self.counts.sum())


def prune_layer(router: torch.Tensor, kept: list[int], num_experts: int) -> LayerResult:
    """Stage 1 only: keep the chosen experts and their router rows, unchanged."""
    dropped = [e for e in range(num_experts) if e not in set(kept)]
    counts = torch.zeros(len(dropped), len(kept), dtype=torch.long)
    return LayerResult(kept, router[kept].clone(), [None] * len(kept), counts, dropped, [0] * len(kept))


def kept_stack(experts: ExpertStack, result: LayerResult) -> ExpertStack:
    """The output layer's K experts as one stack in `experts.dtype` (quantized: float32): rebuilt weights, or the
    original expert's."""
    names = (*PARTS, "bias", "down_bias") if experts.bias is not None else PARTS
    parts = {p: [] for p in names}
    for expert, rebuilt in zip(result.kept, result.experts, strict=True):
        for p in names:
            mine = getattr(rebuilt, p) if rebuilt is not None else None
            if mine is None:
                mine = experts.weight(p, expert) if p in PARTS else getattr(experts, p)[expert]
            parts[p].append(mine.to(experts.dtype))
    return ExpertStack(*(torch.stack(parts[p]) for p in names))


def take_refit(result: LayerResult, before: ExpertStack, after: ExpertStack) -> None:
    """Store refitted projections (in the experts' dtype); an expert the refits did not touch (no tokens)
    stays as it was, a raw copy if it was one."""
    for pos, rebuilt in enumerate(result.experts):
        changed = [p for p in PARTS if not torch.equal(getattr(before, p)[pos].float(), getattr(after, p)[pos].float())]
        if not changed:
            continue
        if rebuilt is None:
            rebuilt = result.experts[pos] = RebuiltExpert(before.gate[pos], before.up[pos], before.down[pos])
        for p in changed:
            setattr(rebuilt, p, getattr(after, p)[pos].to(before.dtype))


def output_bias(family: Family, bias: torch.Tensor, result: LayerResult, intermediate: int) -> torch.Tensor:
    """The router bias rows of the output: the kept experts' values, for a score-correction bias (a
    load-balancing term, docs/method.md, Stage 2); a bias inside the router's logits (gpt-oss) follows Eq. 8 as the
    router's rows do."""
    if family.bias_in_logits and result.router_transferred and result.dropped:
        flat = bias.reshape(-1, 1)
        return transfer_router(flat, result.kept, result.dropped, result.counts.to(flat.device),
                               intermediate).reshape(*bias.shape[:-1], -1)
    return bias[..., result.kept]
