"""Stage 3: spherical weighted k-means over one kept expert's segments (Eq. 9-13, docs/method.md).

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

from .segments import unit_rows

_TINY = torch.finfo(torch.float32).tiny


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

    members [B, M, D] (float32, or the checkpoint's dtype: they are only read, a block at a time, in
    float32), rows >= counts[b] being padding; weights [B, M]; init [B, k].
    Each clustering stops changing when its assignment does (a converged one is a fixed point,
    held as it is while the others go on), so the result equals clustering each alone.
    The member-centroid cosines are formed and reduced in row blocks of at most `block_bytes`.
    """
    b, m, width = members.shape
    device = members.device
    valid = torch.arange(m, device=device)[None, :] < counts[:, None]
    norms = torch.linalg.vector_norm(members, dim=-1, dtype=torch.float32)
    safe_norms = norms.clamp_min(_TINY)
    batch = torch.arange(b, device=device)[:, None]
    centroids = members[batch, init].float() / safe_norms[batch, init, None]
    radius = norms[batch, init]
    weights = weights.float()
    # Work buffers allocated once and reused by every iteration: a fresh large tensor per step costs
    # page faults each time, and the freed ones fragment the heap (docs/performance.md, "Memory").
    work = _Workspace(b, m, k, width, sim_columns.numel(), block_bytes, torch.float32, device)

    assignment = None
    active = torch.ones(b, dtype=torch.bool, device=device)
    iterations = torch.full((b,), max_iters, dtype=torch.long)
    for it in range(1, max_iters + 1):
        new = _nearest(members, centroids, sim_columns, work)
        new = torch.where(valid, new, k)  # padding goes to a spare cluster k, dropped below
        if assignment is not None:
            settled = active & (new == assignment).all(dim=1)
            iterations[settled.cpu()] = it
            active &= ~settled
            if not bool(active.any()):
                break
            new = torch.where(active[:, None], new, assignment)
        assignment = new
        _update(members, norms, safe_norms, weights, assignment, centroids, radius, active, k, work)

    del work  # the buffers go before the results are formed: they are built in the centroids' memory
    return _results(members, counts, assignment, centroids, radius, iterations, k)


def _results(members: torch.Tensor, counts: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor,
             radius: torch.Tensor, iterations: torch.Tensor, k: int) -> list[KMeansResult]:
    """Each clustering's rebuilt segments (centroid times radius, in the centroids' memory), its members'
    clusters and its iteration count."""
    device = members.device
    results = []
    for j in range(members.shape[0]):
        n = int(counts[j])
        own = assignment[j, :n]
        sizes = torch.bincount(own, minlength=k)
        segments = centroids[j].mul_(radius[j, :, None])
        single = (sizes == 1).nonzero().squeeze(-1)
        if single.numel():  # a singleton cluster gives back its member exactly
            owner = torch.full((k,), -1, dtype=torch.long, device=device)
            owner.scatter_(0, own, torch.arange(n, device=device))
            segments[single] = members[j, owner[single]].float()
        results.append(KMeansResult(segments, own, int(iterations[j])))
    return results


class _Workspace:
    """The iteration's large temporaries, sized once per call."""

    def __init__(self, b, m, k, width, sim_width, block_bytes, dtype, device):
        # Member rows per block: their unit similarity parts and their cosines to the centres.
        self.rows = max(1, min(m, block_bytes // (4 * b * (k + sim_width))))
        self.points = torch.empty(b * self.rows * sim_width, dtype=dtype, device=device)
        self.cosines = torch.empty(b * self.rows * k, dtype=dtype, device=device)
        self.centres = torch.empty(b, k, sim_width, dtype=dtype, device=device)
        self.column_runs: list[tuple[int, int, int]] = []  # (start in members, start in points, length)
        self.scatter_rows = max(1, min(b * m, _SCATTER_BYTES // (4 * width)))
        self.scaled = torch.empty(self.scatter_rows, width, dtype=dtype, device=device)
        self.total = torch.empty(b * (k + 1), width, dtype=dtype, device=device)


# Members are scaled and summed into their clusters this many bytes at a time (not all at once).
_SCATTER_BYTES = 8 * 2**20


def _nearest(members: torch.Tensor, centroids: torch.Tensor, sim_columns: torch.Tensor, work: _Workspace
             ) -> torch.Tensor:
    """Index of the most similar centre for each member by cosine on the similarity columns, ties to
    the lower index; [B, M]. Members are normalised a block of rows at a time, as needed, rather than
    kept as a second normalised copy (it would be as large as the members themselves)."""
    b, m, _ = members.shape
    if not work.column_runs:
        work.column_runs = _runs(sim_columns.tolist())
    centres = unit_rows(torch.index_select(centroids, 2, sim_columns, out=work.centres)).transpose(1, 2)
    k, sim_width = centres.shape[2], centres.shape[1]
    out = torch.empty(b, m, dtype=torch.long, device=members.device)
    for i in range(0, m, work.rows):
        rows = min(work.rows, m - i)
        points = work.points[:b * rows * sim_width].view(b, rows, sim_width)
        for start, to, length in work.column_runs:  # slices, not a gather: converted as they are copied
            points[..., to:to + length].copy_(members[:, i:i + rows, start:start + length])
        unit_rows(points)
        block = work.cosines[:b * rows * k].view(b, rows, k)
        out[:, i:i + rows] = torch.bmm(points, centres, out=block).argmax(dim=-1)
    return out


def _runs(columns: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive runs of `columns` as (first column, position in the list, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, c in enumerate(columns):
        if runs and runs[-1][0] + runs[-1][2] == c:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((c, pos, 1))
    return runs


def _update(members, norms, safe_norms, weights, assignment, centroids, radius, active, k, work: _Workspace) -> None:
    """One centroid step, in place, for every clustering still active; cluster k of each row collects
    the padding."""
    b, m, width = members.shape
    groups = (torch.arange(b, device=members.device)[:, None] * (k + 1) + assignment).reshape(-1)

    def per_cluster(values: torch.Tensor) -> torch.Tensor:  # [B, M] -> sums per cluster [B, k + 1]
        out = torch.zeros(b * (k + 1), dtype=values.dtype, device=values.device)
        return out.index_add_(0, groups, values.reshape(-1)).view(b, k + 1)

    counts = torch.bincount(groups, minlength=b * (k + 1)).view(b, k + 1)
    r = per_cluster(norms) / counts.clamp_min(1)
    wsum = per_cluster(weights)
    member_wsum = wsum.gather(1, assignment)
    member_count = counts.gather(1, assignment).float()
    # A cluster whose members all weigh 0 (experts never routed to) is averaged uniformly instead.
    w_tilde = torch.where(member_wsum <= 0, 1.0 / member_count,
                          weights / member_wsum.clamp_min(_TINY))
    scale = (w_tilde * r.gather(1, assignment) / safe_norms).reshape(-1, 1)
    # torch's index_add_, not a numba kernel: numba's scatter is faster alone, but its runtime costs more
    # memory than it saves time (docs/performance.md, "Compute").
    flat = members.view(b * m, width)
    total = work.total.zero_()
    for i in range(0, b * m, work.scatter_rows):
        j = min(i + work.scatter_rows, b * m)
        total.index_add_(0, groups[i:j], torch.mul(flat[i:j], scale[i:j], out=work.scaled[:j - i]))
    total = total.view(b, k + 1, width)[:, :k]
    length = torch.linalg.vector_norm(total, dim=-1)
    update = (counts[:, :k] > 0) & (length > 0) & active[:, None]
    total.div_(length.clamp_min(_TINY)[..., None])
    torch.where(update[..., None], total, centroids, out=centroids)
    torch.where(update, r[:, :k], radius, out=radius)
