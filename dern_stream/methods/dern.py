"""DERN on one MoE layer: reassign dropped experts' segments, transfer routing, recluster kept experts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..options import RewriteOptions
from .kmeans import gate_linf_init, spherical_weighted_kmeans
from .segments import ExpertStack, component_columns, reassign_segments, transfer_counts, transfer_router


@dataclass
class RebuiltExpert:
    """A kept expert's new weights in float32: gate and up [k, d], down [d, k]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class LayerResult:
    kept: list[int]
    router: torch.Tensor  # [K, d] in the router's stored dtype
    # One entry per kept expert: new weights, or None where the expert is written unchanged.
    experts: list[RebuiltExpert | None]
    counts: torch.Tensor  # [len(dropped), K] segments moved from each dropped to each kept expert
    dropped: list[int] = field(default_factory=list)
    kmeans_iterations: list[int] = field(default_factory=list)

    @property
    def segments_reassigned(self) -> int:
        return int(self.counts.sum())


def dern_layer(
    experts: ExpertStack,
    router: torch.Tensor,
    importance: torch.Tensor,
    kept: list[int],
    options: RewriteOptions,
) -> LayerResult:
    """Stages 2 and 3 for one layer; `experts` are float32 on the compute device, `importance` is S."""
    num, h, d = experts.gate.shape
    kept_set = set(kept)
    dropped = [e for e in range(num) if e not in kept_set]
    target_k = options.intermediate_size or h
    assignment = reassign_segments(
        experts, kept, dropped, options.sim_components, options.alpha, options.similarity_block_bytes
    )
    counts = transfer_counts(assignment, len(kept))
    new_router = transfer_router(router, kept, dropped, counts, h) if options.router_transfer else router[kept].clone()

    weights = importance.to(device=experts.gate.device, dtype=torch.float32)
    sim_cols = component_columns(options.sim_components, d, experts.gate.device)
    rebuilt: list[RebuiltExpert | None] = []
    iterations: list[int] = []
    for pos, expert in enumerate(kept):
        own = experts.segments([expert])
        # Reassigned members in (dropped expert, segment) order: deterministic whatever the device.
        src_expert, src_segment = (assignment == pos).nonzero(as_tuple=True)
        if own.shape[0] + src_expert.numel() <= target_k:
            rebuilt.append(None)
            iterations.append(0)
            continue
        source = torch.as_tensor(dropped, dtype=torch.long, device=own.device)[src_expert]
        foreign = experts.segment_rows(source, src_segment)
        members = torch.cat([own, foreign])
        member_weights = torch.cat([weights[expert].expand(h), weights[source]])
        # "own": seed the centroids with the kept expert's own segments (the first h members), so that
        # near-duplicate pooled segments cannot take two centroids and leave a neuron with none.
        init = gate_linf_init(members[:h] if options.kmeans_init == "own" else members, d, target_k)
        result = spherical_weighted_kmeans(
            members, member_weights, sim_cols, target_k, options.kmeans_iters, init, options.similarity_block_bytes,
        )
        seg = result.segments
        rebuilt.append(RebuiltExpert(seg[:, :d], seg[:, d:2 * d], seg[:, 2 * d:].T))
        iterations.append(result.iterations)
    return LayerResult(kept, new_router, rebuilt, counts, dropped, iterations)

