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
    """Cluster M member segments into k; `init` holds the k member indices that seed the centroids.

    The [M, k] member-centroid cosines are reduced in row blocks of at most `block_bytes`."""
    norms = torch.linalg.vector_norm(members, dim=-1)
    safe_norms = norms.clamp_min(torch.finfo(members.dtype).tiny)
    sim_n = F.normalize(members[:, sim_columns], dim=-1)
    centroids = members[init] / safe_norms[init, None]
    radius = norms[init].clone()
    weights = weights.to(members.dtype)

    assignment = None
    iterations = 0
    for iterations in range(1, max_iters + 1):  # noqa: B007 - the count is returned
        new = _nearest(sim_n, F.normalize(centroids[:, sim_columns], dim=-1), block_bytes)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids, radius = _update(members, norms, safe_norms, weights, assignment, centroids, radius)

    counts = torch.bincount(assignment, minlength=k)
    segments = centroids * radius[:, None]
    single = (counts == 1).nonzero().squeeze(-1)
    if single.numel():
        owner = torch.full((k,), -1, dtype=torch.long, device=members.device)
        owner.scatter_(0, assignment, torch.arange(members.shape[0], device=members.device))
        segments[single] = members[owner[single]]
    return KMeansResult(segments, assignment, iterations)


def _nearest(points: torch.Tensor, centres: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Index of the most similar (unit) centre for each (unit) point, ties to the lower index."""
    rows = max(1, block_bytes // (4 * centres.shape[0]))
    return torch.cat([(points[i:i + rows] @ centres.T).argmax(dim=-1) for i in range(0, points.shape[0], rows)])


def _update(members, norms, safe_norms, weights, assignment, centroids, radius):
    k = centroids.shape[0]
    counts = torch.bincount(assignment, minlength=k)
    filled = counts > 0
    r = torch.zeros(k, dtype=members.dtype, device=members.device).index_add_(0, assignment, norms)
    r = r / counts.clamp_min(1)
    wsum = torch.zeros(k, dtype=members.dtype, device=members.device).index_add_(0, assignment, weights)
    # A cluster whose members all weigh 0 (experts never routed to) is averaged uniformly instead.
    uniform = wsum[assignment] <= 0
    w_tilde = torch.where(uniform, 1.0 / counts[assignment].to(members.dtype), weights / wsum[assignment].clamp_min(
        torch.finfo(members.dtype).tiny))
    scaled = members * (w_tilde * r[assignment] / safe_norms)[:, None]
    total = torch.zeros_like(centroids).index_add_(0, assignment, scaled)
    length = torch.linalg.vector_norm(total, dim=-1)
    update = filled & (length > 0)
    new_centroids = centroids.clone()
    new_centroids[update] = total[update] / length[update, None]
    new_radius = torch.where(update, r, radius)
    return new_centroids, new_radius
