"""Stage 2: expert segments, their reassignment to kept experts (Eq. 5-7), and the router transfer (Eq. 8).

Segment i of an expert is the triplet (W_g[i,:], W_u[i,:], W_d[:,i]); its vector is the three
concatenated (gate | up | down, each d long). Similarity uses only the `components` part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..families import PARTS


@dataclass
class ExpertStack:
    """A layer's routed experts on the compute device: gate and up [N, h, d], down [N, d, h]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]

    def segments(self, experts: list[int] | torch.Tensor, components: tuple[str, ...] = PARTS) -> torch.Tensor:
        """[len(experts) * h, len(components) * d]: one row per segment, experts in the given order."""
        idx = torch.as_tensor(experts, dtype=torch.long, device=self.gate.device)
        parts = {
            "gate": lambda: self.gate[idx],
            "up": lambda: self.up[idx],
            "down": lambda: self.down[idx].transpose(1, 2),
        }
        rows = torch.cat([parts[c]() for c in components], dim=-1)
        return rows.reshape(-1, rows.shape[-1])

    def segment_rows(self, experts: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """Full vectors [n, 3d] of the single segments (experts[j], segments[j])."""
        return torch.cat([self.gate[experts, segments], self.up[experts, segments],
                          self.down[experts, :, segments]], dim=-1)


def component_columns(components: tuple[str, ...], d: int, device: torch.device) -> torch.Tensor:
    """Column indices of `components` inside a full (gate | up | down) segment vector."""
    return torch.cat([torch.arange(PARTS.index(c) * d, (PARTS.index(c) + 1) * d, device=device) for c in components])


def max_similarity_to_experts(
    pool: torch.Tensor, kept: torch.Tensor, num_kept: int, block_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pooled segment: the best kept expert and its similarity sim(seg, E_r) = max cosine
    over E_r's original segments (Eq. 6).

    pool [P, D] and kept [num_kept * h, D] are raw segment vectors. The [P, num_kept * h] cosine
    matrix is computed in row blocks of at most `block_bytes` and reduced at once, so it never exists whole.
    """
    kept_n = F.normalize(kept, dim=-1)
    h = kept.shape[0] // num_kept
    rows = max(1, block_bytes // (4 * kept.shape[0]))
    best_sim = torch.empty(pool.shape[0], device=pool.device)
    best_expert = torch.empty(pool.shape[0], dtype=torch.long, device=pool.device)
    for start in range(0, pool.shape[0], rows):
        block = F.normalize(pool[start:start + rows], dim=-1) @ kept_n.T
        # Clamp: cosines of identical vectors can round to just above 1, and alpha = 1 must move nothing.
        per_expert = block.view(block.shape[0], num_kept, h).amax(dim=-1).clamp_(-1.0, 1.0)
        best_sim[start:start + rows], best_expert[start:start + rows] = per_expert.max(dim=-1)
    return best_sim, best_expert


def reassign_segments(
    experts: ExpertStack,
    kept: list[int],
    dropped: list[int],
    components: tuple[str, ...],
    alpha: float,
    block_bytes: int,
) -> torch.Tensor:
    """Target kept position (0..K-1) of every pooled segment, -1 where it is dropped.

    Result [len(dropped), h]; a segment moves only if its best similarity exceeds alpha (Eq. 7).
    Only the kept experts' original segments count, so the result does not depend on order.
    """
    h = experts.intermediate
    target = torch.full((len(dropped), h), -1, dtype=torch.long, device=experts.gate.device)
    if not dropped:
        return target
    kept_segments = experts.segments(kept, components)
    for row, expert in enumerate(dropped):  # one dropped expert's segments at a time, not the whole pool
        sim, best = max_similarity_to_experts(experts.segments([expert], components), kept_segments, len(kept),
                                              block_bytes)
        target[row] = torch.where(sim > alpha, best, -1)
    return target


def transfer_counts(assignment: torch.Tensor, num_kept: int) -> torch.Tensor:
    """m[o, r]: how many segments of dropped expert o went to kept expert r; [len(dropped), num_kept]."""
    counts = torch.zeros(assignment.shape[0], num_kept + 1, dtype=torch.long, device=assignment.device)
    counts.scatter_add_(1, assignment + 1, torch.ones_like(assignment))  # column 0 collects the -1s
    return counts[:, 1:]


def transfer_router(
    router: torch.Tensor, kept: list[int], dropped: list[int], counts: torch.Tensor, intermediate: int
) -> torch.Tensor:
    """Eq. 8: W_r[r] += sum_o (m[o, r] / h) W_r[o]; rows of experts that received nothing stay bit-identical."""
    out = router[kept].clone()
    if not dropped:
        return out
    moved = counts.T.double() / intermediate  # [K, dropped]
    delta = (moved @ router[dropped].double()).to(torch.float32)
    touched = counts.sum(dim=0) > 0
    out[touched] = (out[touched].float() + delta[touched]).to(router.dtype)
    return out
