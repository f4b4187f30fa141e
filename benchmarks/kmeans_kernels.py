"""torch against numba for the two CPU kernels of the k-means, on one Mixtral-like expert's sizes.

    python benchmarks/kmeans_kernels.py [--members 3072] [--k 1536] [--hidden 1024] [--repeat 3]

1. assignment: the most similar centroid of every member (cosine on the up|down part):
   torch = blocked matmul + argmax (BLAS); numba = one fused parallel loop that never stores the
   [M, k] matrix.
2. centroid update: the weighted scatter of the members into their clusters:
   torch = index_add_ of the scaled members; numba = a parallel loop over column blocks.
3. the whole clustering of one expert with either scatter, and the RSS that numba's runtime adds.
Prints the best of `--repeat` runs of each, their ratio, and checks the two agree. The choice it
led to (torch for both) is in docs/performance.md, "Compute". Needs numba (`pip install numba`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from dern_stream.experts.kmeans import _nearest, _Workspace, spherical_weighted_kmeans


def numba_kernels():
    """Compiled on demand, so the RSS before numba's runtime is loaded can be read first."""
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def nearest_numba(points, centres):
        m, k = points.shape[0], centres.shape[0]
        out = np.empty(m, dtype=np.int64)
        for i in numba.prange(m):
            best, arg = -np.inf, 0
            for j in range(k):
                s = np.float32(0.0)
                for c in range(points.shape[1]):
                    s += points[i, c] * centres[j, c]
                if s > best:
                    best, arg = s, j
            out[i] = arg
        return out


    @numba.njit(parallel=True, cache=True)
    def scatter_numba(rows, coef, groups, total, blocks):
        # Each thread owns a slice of the columns of every output row: no two threads add to the same
        # number, and every number is summed in member order, as index_add_ does on the CPU.
        width = rows.shape[1]
        step = (width + blocks - 1) // blocks
        for b in numba.prange(blocks):
            lo, hi = b * step, min(width, (b + 1) * step)
            for i in range(rows.shape[0]):
                g, w = groups[i], coef[i]
                for c in range(lo, hi):
                    total[g, c] += w * rows[i, c]

    return numba, nearest_numba, scatter_numba


def numba_scatter(rows: torch.Tensor, coef: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    numba, _, scatter_numba = KERNELS
    total = np.zeros((k, rows.shape[1]), dtype=np.float32)
    scatter_numba(rows.numpy(), coef.numpy(), groups.numpy(), total, numba.get_num_threads())
    return torch.from_numpy(total)


KERNELS = None


def rss_mb() -> int:
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=3072, help="own h segments plus the reassigned ones")
    ap.add_argument("--k", type=int, default=1536, help="centroids (the intermediate size)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6, help="k-means iterations in the whole-clustering timing")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    d, m, k = a.hidden, a.members, a.k
    members = torch.randn(m, 3 * d, generator=gen)
    sim = F.normalize(members[:, d:], dim=-1).contiguous()
    centroids = torch.randn(k, 3 * d, generator=gen)
    centres = F.normalize(centroids[:, d:], dim=-1)
    cols = torch.arange(d, 3 * d)
    global KERNELS
    before_numba = rss_mb()
    KERNELS = numba_kernels()
    numba, nearest_numba, _ = KERNELS
    print(f"{torch.get_num_threads()} torch threads, {numba.get_num_threads()} numba threads; "
          f"M={m} members, k={k} centroids, d={d}")

    nearest_numba(sim[:8].numpy(), centres[:8].numpy())  # compile outside the timing
    # torch's timing includes normalising the members block by block, as the rewrite does; numba gets them
    # normalised already.
    def torch_nearest():
        work = _Workspace(1, m, k, 3 * d, 2 * d, 256 * 2**20, torch.float32, "cpu")
        return _nearest(members[None], centroids[None], cols, work)[0]

    t_torch = best_of(torch_nearest, a.repeat)
    t_numba = best_of(lambda: nearest_numba(sim.numpy(), centres.numpy()), a.repeat)
    agree = (torch_nearest().numpy() == nearest_numba(sim.numpy(), centres.numpy())).mean()
    print(f"assignment: torch {t_torch * 1e3:.1f} ms, numba {t_numba * 1e3:.1f} ms, "
          f"numba / torch = {t_numba / t_torch:.2f}x (same argmax for {agree:.2%} of members)")

    assignment = torch.randint(0, k, (m,), generator=gen)
    coef = torch.rand(m, generator=gen)
    numba_scatter(members[:8], coef[:8], assignment[:8], k)  # compile outside the timing
    t_torch = best_of(lambda: torch.zeros(k, 3 * d).index_add_(0, assignment, members * coef[:, None]), a.repeat)
    t_numba = best_of(lambda: numba_scatter(members, coef, assignment, k), a.repeat)
    same = torch.equal(numba_scatter(members, coef, assignment, k),
                       torch.zeros(k, 3 * d).index_add_(0, assignment, members * coef[:, None]))
    print(f"centroid scatter: torch index_add_ {t_torch * 1e3:.1f} ms, numba {t_numba * 1e3:.1f} ms, "
          f"numba / torch = {t_numba / t_torch:.2f}x (bit-identical results: {same})")

    print(f"process RSS with numba's runtime loaded and both kernels compiled: {rss_mb()} MB "
          f"(without: {before_numba} MB)")

    # 3. The whole clustering of one expert, the scatter done either way (the other steps are torch).
    weights, init = torch.rand(m, generator=gen), torch.randperm(m, generator=gen)[:k]
    cols = torch.arange(d, 3 * d)

    def cluster() -> None:
        spherical_weighted_kmeans(members, weights, cols, k, a.iters, init)

    times = {}
    real = torch.Tensor.index_add_

    def numba_index_add(self, dim, index, source):  # the project's one index_add_ of rows, done by numba
        if self.dim() == 2 and dim == 0:
            return self.copy_(numba_scatter(source, torch.ones(source.shape[0]), index, self.shape[0]))
        return real(self, dim, index, source)

    for use in (False, True):
        torch.Tensor.index_add_ = numba_index_add if use else real
        times[use] = best_of(cluster, a.repeat)
    torch.Tensor.index_add_ = real
    print(f"whole k-means ({a.iters} iterations): torch scatter {times[False]:.2f} s, "
          f"numba scatter {times[True]:.2f} s, "
          f"numba / torch = {times[True] / times[False]:.2f}x")

if __name__ == "__main__":
    main()
