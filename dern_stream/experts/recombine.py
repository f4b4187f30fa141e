"""DERN on one MoE layer: reassign dropped experts' segments, transfer routing, recluster kept experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.stage_clock import NO_CLOCK, StageClock
from .kmeans import batched_spherical_kmeans, gate_linf_init
from .result import LayerResult, RebuiltExpert
from .segments import ExpertStack, best_kept_experts, component_columns, transfer_counts, transfer_router


@dataclass(frozen=True)
class DernParams:
    """What DERN needs to know (docs/method.md, Stages 2 and 3)."""

    alpha: float = 0.4  # a pooled segment moves only if its best cosine exceeds this
    sim_components: tuple[str, ...] = ("up", "down")  # the parts of a segment the cosines compare
    kmeans_iters: int = 20
    kmeans_init: str = "gate-linf"  # or "own": seed with the kept expert's own segments
    router_transfer: bool = True  # Eq. 8
    intermediate_size: int | None = None  # neurons per rebuilt expert (None: as now)
    block_bytes: int = 16 * 2**20  # the largest float32 block the similarity and k-means allocate


def dern_layer(
    experts: ExpertStack,
    router: torch.Tensor,
    importance: torch.Tensor,
    kept: list[int],
    params: DernParams,
    clock: StageClock = NO_CLOCK,
) -> LayerResult:
    """Stages 2 and 3 for one layer; `experts` are on the compute device, `importance` is S.

    Rebuilt experts come back in `experts.dtype`, cast once from the float32 clustering (quantized experts: float32
    until they are written)."""
    num, h, d = experts.gate.shape
    kept_set = set(kept)
    dropped = [e for e in range(num) if e not in kept_set]
    target_k = params.intermediate_size or h
    with clock("reassign"):
        target, similarity = best_kept_experts(experts, kept, dropped, params.sim_components, params.block_bytes)
        # Cosines are clamped to <= 1, so alpha = 1 moves nothing.
        assignment = torch.where(similarity > params.alpha, target, -1)
        histogram = similarity_histogram(similarity)
        counts = transfer_counts(assignment, len(kept))
        new_router = (transfer_router(router, kept, dropped, counts, h) if params.router_transfer
                      else router[kept].clone())

    with clock("cluster"):
        weights = importance.to(device=experts.gate.device, dtype=torch.float32)
        dropped_ids = torch.as_tensor(dropped, dtype=torch.long, device=experts.gate.device)
        jobs = []  # (position, kept expert, sources of its reassigned members, their segments)
        for pos, expert in enumerate(kept):
            # Reassigned members in (dropped expert, segment) order: deterministic whatever the device.
            src_expert, src_segment = (assignment == pos).nonzero(as_tuple=True)
            if h + src_expert.numel() > target_k:  # else the expert is written unchanged
                jobs.append((pos, expert, dropped_ids[src_expert], src_segment))
        rebuilt: list[RebuiltExpert | None] = [None] * len(kept)
        iterations = [0] * len(kept)
        sizes = torch.zeros(0, dtype=torch.long)
        for batch in _batches(jobs, h, experts.segment_width, len(params.sim_components) * d, target_k,
                              params.block_bytes):
            for (pos, _, _, _), result in zip(batch, _cluster(experts, batch, weights, target_k, params),
                                              strict=True):
                seg = result.segments.to(experts.dtype)
                # Views of one [k, 3d] block (down transposed): a contiguous down would be a 4th third.
                rebuilt[pos] = RebuiltExpert(seg[:, :d], seg[:, d:2 * d], seg[:, 2 * d:3 * d].T,
                                             seg[:, 3 * d:] if experts.bias is not None else None)
                iterations[pos] = result.iterations
                sizes = torch.cat([sizes, torch.bincount(result.assignment, minlength=target_k).cpu()])
    return LayerResult(kept, new_router, rebuilt, counts, dropped, iterations, params.router_transfer, histogram,
                       size_counts(sizes))


SIMILARITY_BINS = 40  # over [-1, 1]: bins 0.05 wide, so alpha's usual values fall on bin edges


def similarity_histogram(similarity: torch.Tensor) -> list[int]:
    """How many pooled segments have their best similarity in each of SIMILARITY_BINS bins over [-1, 1]."""
    if similarity.numel() == 0:
        return []
    return [int(c) for c in torch.histc(similarity.float().cpu(), bins=SIMILARITY_BINS, min=-1.0, max=1.0)]


def size_counts(sizes: torch.Tensor) -> list[list[int]]:
    """[size, how many clusters have it] for every size that occurs, ascending."""
    values, counts = torch.unique(sizes, return_counts=True)
    return [[int(v), int(c)] for v, c in zip(values, counts, strict=True)]


def _batches(jobs: list, h: int, width: int, sim_width: int, k: int, budget: int) -> list[list]:
    """Consecutive kept experts grouped so one batch's working set (taken as float32) stays within `budget`
    (members, the centroids, their similarity part and the cluster sums);
    at least one each."""
    batches: list[list] = []
    widest = 0
    for job in jobs:
        rows = h + job[2].numel()
        if batches and (len(batches[-1]) + 1) * _job_bytes(max(widest, rows), width, sim_width, k) <= budget:
            batches[-1].append(job)
            widest = max(widest, rows)
        else:
            batches.append([job])
            widest = rows
    return batches


def _job_bytes(rows: int, width: int, sim_width: int, k: int) -> int:
    return 4 * (rows * width + k * (2 * width + sim_width))


def _cluster(experts: ExpertStack, batch: list, weights: torch.Tensor, k: int, params: DernParams):
    """Gather each job's members (own segments first) into one padded batch, in float32 (FP8 members are
    dequantized values: the checkpoint's dtype would round them), and cluster it."""
    h, d = experts.intermediate, experts.gate.shape[2]
    sizes = [h + job[2].numel() for job in batch]
    device = experts.gate.device
    members = torch.zeros(len(batch), max(sizes), experts.segment_width, dtype=torch.float32, device=device)
    member_weights = torch.zeros(len(batch), max(sizes), device=device)
    init = torch.empty(len(batch), k, dtype=torch.long, device=device)
    for j, (_, expert, source, segment) in enumerate(batch):
        experts.segments_into(members[j, :h], expert)
        experts.segment_rows_into(members[j, h:sizes[j]], source, segment)
        member_weights[j, :h] = weights[expert]
        member_weights[j, h:sizes[j]] = weights[source]
        # "own": seed the centroids with the kept expert's own segments (the first h members), so that
        # near-duplicate pooled segments cannot take two centroids and leave a neuron with none.
        init[j] = gate_linf_init(members[j, :h] if params.kmeans_init == "own" else members[j, :sizes[j]], d, k)
    sim_cols = component_columns(params.sim_components, d, device)
    counts = torch.tensor(sizes, device=device)
    return batched_spherical_kmeans(members, member_weights, counts, sim_cols, k, params.kmeans_iters, init,
                                    params.block_bytes)
