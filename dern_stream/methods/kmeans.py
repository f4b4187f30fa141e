"""Stage 3: spherical weighted k-means over one kept expert's segments (Eq. 9-13, method.md).

Members are full segment vectors v (gate | up | down, 3d long). Assignment uses cosine on the
similarity columns; centroids use the full vector:
    r_j = mean ||v_i|| over cluster j,   v^_i = v_i r_j / ||v_i||,
    c_j = sum w~_i v^_i / ||sum w~_i v^_i||,   w~_i = w_i / sum_{cluster j} w,
and the rebuilt segment is c_j r_j. Empty clusters keep their previous centroid; a singleton
cluster gives back its member unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KMeansResult:
    segments: torch.Tensor  # [k, 3d] rebuilt segment vectors
    assignment: torch.Tensor  # [M] cluster of each member
    iterations: int


def gate_linf_init(members: torch.Tensor, d: int, k: int) -> torch.Tensor:
    """Indices of the k members with the largest max|w_g| (ties: earlier member first)."""
    scores = members[:, :d].abs().amax(dim=-1)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def spherical_weighted_kmeans(
    members: torch.Tensor,
    weights: torch.Tensor,
    sim_columns: torch.Tensor,
    k: int,
    max_iters: int,
    init: torch.Tensor,
    block_bytes: int = 256 * 2**20,
) -> KMeansResult:
    """Cluster M member segments into k; `init` holds the k member indices that seed the centroids."""
    count = torch.tensor([members.shape[0]], device=members.device)
    return batched_spherical_kmeans(members[None], weights[None], count, sim_columns, k, max_iters, init[None],
                                    block_bytes)[0]


def batched_spherical_kmeans(
    members: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    sim_columns: torch.Tensor,
    k: int,
    max_iters: int,
    init: torch.Tensor,
    block_bytes: int = 256 * 2**20,
) -> list[KMeansResult]:
    """Several independent clusterings at once (one per kept expert): one batched matmul per step
    instead of one small one per expert, which is what keeps a GPU busy on many small experts.

    members [B, M, D] float32, rows >= counts[b] being padding; weights [B, M]; init [B, k].
    Each clustering stops changing when its assignment does (a converged one is a fixed point,
    held as it is while the others go on), so the result equals clustering each alone.
    The [B, rows, k] member-centroid cosines are reduced in row blocks of at most `block_bytes`.
    """
    b, m, _ = members.shape
    device = members.device
    valid = torch.arange(m, device=device)[None, :] < counts[:, None]
    norms = torch.linalg.vector_norm(members, dim=-1)
    safe_norms = norms.clamp_min(torch.finfo(members.dtype).tiny)
    sim_n = F.normalize(members[..., sim_columns], dim=-1)
    batch = torch.arange(b, device=device)[:, None]
    centroids = members[batch, init] / safe_norms[batch, init, None]
    radius = norms[batch, init]
    weights = weights.to(members.dtype)

    assignment = None
    active = torch.ones(b, dtype=torch.bool, device=device)
    iterations = torch.full((b,), max_iters, dtype=torch.long)
    for it in range(1, max_iters + 1):
        new = _nearest(sim_n, F.normalize(centroids[..., sim_columns], dim=-1), block_bytes)
        new = torch.where(valid, new, k)  # padding goes to a spare cluster k, dropped below
        if assignment is not None:
            settled = active & (new == assignment).all(dim=1)
            iterations[settled.cpu()] = it
            active &= ~settled
            if not bool(active.any()):
                break
            new = torch.where(active[:, None], new, assignment)
        assignment = new
        updated, new_radius = _update(members, norms, safe_norms, weights, assignment, centroids, radius, k)
        centroids = torch.where(active[:, None, None], updated, centroids)
        radius = torch.where(active[:, None], new_radius, radius)

    results = []
    for j in range(b):
        n = int(counts[j])
        own = assignment[j, :n]
        sizes = torch.bincount(own, minlength=k)
        segments = centroids[j] * radius[j, :, None]
        single = (sizes == 1).nonzero().squeeze(-1)
        if single.numel():  # a singleton cluster gives back its member exactly
            owner = torch.full((k,), -1, dtype=torch.long, device=device)
            owner.scatter_(0, own, torch.arange(n, device=device))
            segments[single] = members[j, owner[single]]
        results.append(KMeansResult(segments, own, int(iterations[j])))
    return results


def _nearest(points: torch.Tensor, centres: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Index of the most similar (unit) centre for each (unit) point, ties to the lower index; [B, M]."""
    rows = max(1, block_bytes // (4 * centres.shape[0] * centres.shape[1]))
    return torch.cat([torch.bmm(points[:, i:i + rows], centres.transpose(1, 2)).argmax(dim=-1)
                      for i in range(0, points.shape[1], rows)], dim=1)


def _update(members, norms, safe_norms, weights, assignment, centroids, radius, k):
    """One centroid step for every clustering; cluster k of each row collects the padding."""
    b, m, width = members.shape
    groups = (torch.arange(b, device=members.device)[:, None] * (k + 1) + assignment).reshape(-1)

    def per_cluster(values: torch.Tensor) -> torch.Tensor:  # [B, M] -> sums per cluster [B, k + 1]
        out = torch.zeros(b * (k + 1), dtype=values.dtype, device=values.device)
        return out.index_add_(0, groups, values.reshape(-1)).view(b, k + 1)

    counts = torch.bincount(groups, minlength=b * (k + 1)).view(b, k + 1)
    r = per_cluster(norms) / counts.clamp_min(1)
    wsum = per_cluster(weights)
    member_wsum = wsum.gather(1, assignment)
    member_count = counts.gather(1, assignment).to(members.dtype)
    # A cluster whose members all weigh 0 (experts never routed to) is averaged uniformly instead.
    w_tilde = torch.where(member_wsum <= 0, 1.0 / member_count,
                          weights / member_wsum.clamp_min(torch.finfo(members.dtype).tiny))
    scaled = members * (w_tilde * r.gather(1, assignment) / safe_norms)[..., None]
    # torch's index_add_, not a numba kernel: numba's scatter is faster alone but its runtime costs
    # 0.1 GB of RSS for about 12% of the clustering time (benchmarks/kernels.py; README, "Performance").
    total = torch.zeros(b * (k + 1), width, dtype=members.dtype, device=members.device)
    total = total.index_add_(0, groups, scaled.reshape(-1, width)).view(b, k + 1, width)[:, :k]
    del scaled
    length = torch.linalg.vector_norm(total, dim=-1)
    update = (counts[:, :k] > 0) & (length > 0)
    new_centroids = torch.where(update[..., None], total / length.clamp_min(torch.finfo(members.dtype).tiny)[..., None],
                                centroids)
    return new_centroids, torch.where(update, r[:, :k], radius)
