"""Baselines over the same machinery: pruning, REAP ranking, M-SMoE and HC-SMoE whole-expert merging.

Each returns a LayerResult like DERN's, so writing, auditing and evaluation are shared. A merged
expert counts all h of each absorbed expert's segments as moved (`counts`), which makes the
"fraction reassigned" column comparable across methods.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.optimize import linear_sum_assignment

from ..families import GroupPlan
from .forward import ExpertStats
from .importance import select_experts
from .result import LayerResult, RebuiltExpert
from .segments import ExpertStack


def _routing_groups(num_experts: int, groups: GroupPlan | None) -> list[list[int]]:
    """The experts that may merge with each other: each routing group when groups are kept (DeepSeek
    group-limited routing), else all of them."""
    count = groups.n_group if groups is not None and groups.balanced else 1
    size = num_experts // count
    return [list(range(g * size, (g + 1) * size)) for g in range(count)]


def _merge(experts: ExpertStack, members: list[int], weights: torch.Tensor, align_to: int | None) -> RebuiltExpert:
    """Weighted average of whole experts; with `align_to`, each member's neurons are first permuted to
    best match that expert's (weight matching: maximise the sum of gate|up|down dot products)."""
    w = weights[members].to(torch.float64)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(members))
    f32 = torch.float32  # accumulated in float32, cast once to the experts' dtype
    gate = torch.zeros_like(experts.gate[0], dtype=f32)
    up, down = torch.zeros_like(experts.up[0], dtype=f32), torch.zeros_like(experts.down[0], dtype=f32)
    biases = experts.bias is not None
    bias = torch.zeros_like(experts.bias[0], dtype=f32) if biases else None
    down_bias = torch.zeros_like(experts.down_bias[0], dtype=f32) if biases else None
    anchor = experts.segments([align_to]) if align_to is not None else None
    for e, share in zip(members, w.tolist(), strict=True):
        perm = torch.arange(experts.intermediate, device=gate.device)
        if anchor is not None and e != align_to:
            score = (anchor @ experts.segments([e]).T).double().cpu().numpy()
            _, cols = linear_sum_assignment(score, maximize=True)
            perm = torch.as_tensor(cols, device=gate.device)
        gate += share * experts.weight("gate", e)[perm].float()
        up += share * experts.weight("up", e)[perm].float()
        down += share * experts.weight("down", e)[:, perm].float()
        if biases:
            bias += share * experts.bias[e][perm].float()
            down_bias += share * experts.down_bias[e].float()
    dtype = experts.dtype
    return RebuiltExpert(gate.to(dtype), up.to(dtype), down.to(dtype), bias.to(dtype) if biases else None,
                         down_bias.to(dtype) if biases else None)


def msmoe_layer(experts: ExpertStack, router: torch.Tensor, stats: ExpertStats, keep: int,
                groups: GroupPlan | None) -> LayerResult:
    """M-SMoE (Li et al. 2024, "Merge, Then Compress"): the `keep` most frequently used experts dominate;
    every other expert joins the dominant expert whose router logits on the calibration tokens are
    most similar (cosine), and each group is merged frequency-weighted after permutation alignment
    to its dominant expert. The dominant experts keep their router rows."""
    n = router.shape[0]
    kept = select_experts(stats.frequency, keep, groups)
    logits = torch.nn.functional.normalize(stats.router_logits.double(), dim=-1)
    sim = (logits @ logits.T).cpu()
    owner = {e: e for e in kept}
    for members in _routing_groups(n, groups):
        dominant = [k for k in kept if k in members]
        for e in members:
            if e not in owner:
                owner[e] = max(dominant, key=lambda k: (float(sim[e, k]), -k))
    return _assemble(experts, router, kept, owner, stats.frequency, align=True)


def hcsmoe_layer(experts: ExpertStack, router: torch.Tensor, stats: ExpertStats, keep: int,
                 groups: GroupPlan | None) -> LayerResult:
    """HC-SMoE (Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering"):
    average-linkage clustering of the experts' mean outputs on the calibration inputs (Euclidean
    distance, as the authors' code) into `keep` clusters, merged frequency-weighted. HC-SMoE's code keeps
    the full router and maps every member to its merged expert, which a K-expert checkpoint cannot
    express; here each cluster takes the router row of its most frequently used member."""
    n = router.shape[0]
    member_groups = _routing_groups(n, groups)
    per_group = keep // len(member_groups)
    owner: dict[int, int] = {}
    for members in member_groups:
        features = stats.mean_output[members].double().cpu().numpy()
        if per_group >= len(members):
            labels = np.arange(len(members))
        else:
            labels = cut_tree(linkage(features, method="average", metric="euclidean"), n_clusters=per_group)[:, 0]
        for label in np.unique(labels):
            cluster = [members[i] for i in np.flatnonzero(labels == label)]
            rep = max(cluster, key=lambda e: (float(stats.frequency[e]), -e))
            owner.update({e: rep for e in cluster})
    kept = sorted(set(owner.values()))
    return _assemble(experts, router, kept, owner, stats.frequency, align=False)


def _assemble(experts: ExpertStack, router: torch.Tensor, kept: list[int], owner: dict[int, int],
              frequency: torch.Tensor, align: bool) -> LayerResult:
    n, h = router.shape[0], experts.intermediate
    dropped = [e for e in range(n) if e not in set(kept)]
    counts = torch.zeros(len(dropped), len(kept), dtype=torch.long)
    rebuilt: list[RebuiltExpert | None] = []
    for pos, k in enumerate(kept):
        members = [e for e in range(n) if owner[e] == k]
        for e in members:
            if e != k:
                counts[dropped.index(e), pos] = h
        rebuilt.append(None if len(members) == 1 else _merge(experts, members, frequency, k if align else None))
    return LayerResult(kept, router[kept].clone(), rebuilt, counts, dropped, [0] * len(kept))
