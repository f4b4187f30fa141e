"""Stage 2: expert segments, their reassignment to kept experts (Eq. 5-7), and the router transfer (Eq. 8).

Segment i of an expert is the triplet (W_g[i,:], W_u[i,:], W_d[:,i]); its vector is the three
concatenated (gate | up | down, each d long). Similarity uses only the `components` part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import PARTS
from ..storage.fp8_blocks import dequantize, dequantize_vectors, scale_shape


@dataclass
class ExpertStack:
    """A layer's routed experts: gate and up [N, h, d], down [N, d, h]; where the family has expert biases
    (gpt-oss), `bias` [N, h, 2] (each neuron's gate and up bias: part of its segment) and `down_bias` [N, d]
    (one per expert, not per neuron).

    Held as stored (bf16 models: half the memory of float32), and FP8 checkpoints stay FP8 with their block
    scales (`scales`: gate's, up's, down's, float32 [N, *grid]; `block` their block shape), so a layer
    costs its stored bytes; MXFP4 experts are held dequantized in bf16, which holds their values exactly
    (`quantized`). Read the weights through `weight`, `part_rows` and the `segments*` methods, which convert
    (dequantize) only the experts or rows asked for, to float32 (FP8) or the stored dtype."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    block: tuple[int, int] | None = None
    quantized: bool = False  # held dequantized from a quantized format (MXFP4)

    @classmethod
    def empty(cls, n: int, h: int, d: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              biases: bool = False, block: tuple[int, int] | None = None, quantized: bool = False) -> ExpertStack:
        """Uninitialised; `block`: FP8 weights (`dtype` is then float8_e4m3fn) with float32 scales per block;
        `quantized`: held dequantized (MXFP4)."""
        def new(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)
        scales = None
        if block is not None:
            scales = tuple(new(n, *scale_shape(s, block), dtype=torch.float32) for s in ((h, d), (h, d), (d, h)))
        return cls(new(n, h, d), new(n, h, d), new(n, d, h), new(n, h, 2) if biases else None,
                   new(n, d) if biases else None, scales, block, quantized)

    @property
    def segment_width(self) -> int:
        """A full segment vector's length: gate | up | down (d each), then the gate and up biases if any."""
        return 3 * self.gate.shape[2] + (2 if self.bias is not None else 0)

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype results built from these experts come back in: the stored one; float32 for quantized experts
        (FP8, MXFP4), which are quantized again only when they are written."""
        return torch.float32 if self.scales is not None or self.quantized else self.gate.dtype

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.gate, self.up, self.down, self.bias, self.down_bias, *(self.scales or ()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def to(self, device: torch.device) -> ExpertStack:
        moved = [t.to(device) if t is not None else None for t in self._tensors()]
        return ExpertStack(*moved[:5], tuple(moved[5:]) if self.scales is not None else None, self.block,
                           self.quantized)

    def weight(self, part: str, experts: int | torch.Tensor) -> torch.Tensor:
        """`part` of one expert ([h, d] gate or up, [d, h] down) or of several ([n, ...]), as stored: float32
        when FP8 (dequantized), else the stored tensor's view."""
        w = getattr(self, part)[experts]
        if self.scales is None:
            return w
        return dequantize(w, self.scales[PARTS.index(part)][experts], self.block)

    def segments(self, experts: list[int] | torch.Tensor, components: tuple[str, ...] = PARTS) -> torch.Tensor:
        """float32 [len(experts) * h, len(components) * d]: one row per segment, experts in the given order."""
        idx = torch.as_tensor(experts, dtype=torch.long, device=self.gate.device)
        pieces = [self.weight(c, idx).transpose(1, 2) if c == "down" else self.weight(c, idx) for c in components]
        pieces = [p.float() for p in pieces]
        if components == PARTS and self.bias is not None:
            pieces.append(self.bias[idx].float())
        rows = torch.cat(pieces, dim=-1)
        return rows.reshape(-1, rows.shape[-1])

    def part_rows(self, part: str, expert: int) -> torch.Tensor:
        """[h, d]: one expert's `part` with a row per segment (down is stored transposed)."""
        w = self.weight(part, expert)
        return w.T if part == "down" else w

    def unit_segments_into(self, out: torch.Tensor, experts: list[int], components: tuple[str, ...]) -> torch.Tensor:
        """Fill out [len(experts) * h, len(components) * d] with the experts' segments (their
        `components` part), scaled to unit length in place; returns out."""
        h, d = self.intermediate, self.gate.shape[2]
        for i, e in enumerate(experts):
            for c, part in enumerate(components):
                out[i * h:(i + 1) * h, c * d:(c + 1) * d] = self.part_rows(part, e)
        return unit_rows(out)

    def segments_into(self, out: torch.Tensor, expert: int) -> None:
        """Fill out [h, segment_width] with one expert's full segment vectors, converting without a temporary
        (FP8: one part's float32 at a time)."""
        d = self.gate.shape[2]
        for c, part in enumerate(PARTS):
            out[:, c * d:(c + 1) * d] = self.part_rows(part, expert)
        if self.bias is not None:
            out[:, 3 * d:] = self.bias[expert]

    def segment_rows_into(self, out: torch.Tensor, experts: torch.Tensor, segments: torch.Tensor) -> None:
        """Fill out [n, segment_width] with the full vectors of the single segments (experts[j], segments[j])."""
        d = self.gate.shape[2]
        gate, up, down = self.gate[experts, segments], self.up[experts, segments], self.down[experts, :, segments]
        if self.scales is not None:  # each row's (gate, up) or column's (down) own scales, spread over it
            (rows, cols), (gs, us, ds) = self.block, self.scales
            gate = dequantize_vectors(gate, gs[experts, segments // rows], cols)
            up = dequantize_vectors(up, us[experts, segments // rows], cols)
            down = dequantize_vectors(down, ds[experts, :, segments // cols], rows)
        out[:, :d], out[:, d:2 * d], out[:, 2 * d:3 * d] = gate, up, down
        if self.bias is not None:
            out[:, 3 * d:] = self.bias[experts, segments]


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) along the last axis, in place (what F.normalize computes, without a copy)."""
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12))


def component_columns(components: tuple[str, ...], d: int, device: torch.device) -> torch.Tensor:
    """Column indices of `components` inside a full (gate | up | down) segment vector."""
    return torch.cat([torch.arange(PARTS.index(c) * d, (PARTS.index(c) + 1) * d, device=device) for c in components])


def reassign_segments(
    experts: ExpertStack,
    kept: list[int],
    dropped: list[int],
    components: tuple[str, ...],
    alpha: float,
    block_bytes: int,
) -> torch.Tensor:
    """Target kept position (0..K-1) of every pooled segment, -1 where it is dropped.

    Result [len(dropped), h]. A segment moves to its best kept expert only if its similarity to it
    exceeds alpha (Eq. 7); see best_kept_experts."""
    h = experts.intermediate
    if not dropped or alpha >= 1.0:  # cosines are clamped to <= 1, so alpha = 1 moves nothing
        return torch.full((len(dropped), h), -1, dtype=torch.long, device=experts.gate.device)
    target, similarity = best_kept_experts(experts, kept, dropped, components, block_bytes)
    return torch.where(similarity > alpha, target, -1)


def best_kept_experts(
    experts: ExpertStack,
    kept: list[int],
    dropped: list[int],
    components: tuple[str, ...],
    block_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pooled segment's most similar kept expert (position 0..K-1) and that similarity, both
    [len(dropped), h].

    sim(seg, E_r) = max cosine between seg and the kept expert E_r's *original* segments (Eq. 6), so
    the result does not depend on order.

    Batched over kept experts and blockwise: the kept experts are taken a block at a time (as
    many as fit in `block_bytes` once normalised), the pooled segments likewise, and each block of
    cosines is reduced at once, so no [pooled, K h] matrix ever exists whole and at most one block
    of float32 copies does. Ties go to the lower kept expert.
    """
    h, device = experts.intermediate, experts.gate.device
    target = torch.full((len(dropped), h), -1, dtype=torch.long, device=device)
    best_sim = torch.full((len(dropped), h), -2.0, device=device)
    if not dropped:
        return target, best_sim
    width = len(components) * experts.gate.shape[2]
    rows_bytes = 4 * h * width  # one expert's similarity rows in float32
    per_block = max(1, min(len(kept), block_bytes // (2 * rows_bytes)))
    # Each pooled expert in a block costs its rows and its cosines against the kept block.
    pool_bytes = 4 * h * (width + per_block * h)
    pool_experts = max(1, min(len(dropped), (block_bytes - per_block * rows_bytes) // pool_bytes))
    # Buffers filled in place block after block: no concatenated or normalised copies pile up.
    kept_buf = torch.empty(per_block * h, width, device=device)
    pool_buf = torch.empty(pool_experts * h, width, device=device)
    cos_buf = torch.empty(pool_experts * h * per_block * h, device=device)
    for k0 in range(0, len(kept), per_block):
        block = kept[k0:k0 + per_block]
        kept_n = experts.unit_segments_into(kept_buf[:len(block) * h], block, components)
        for p0 in range(0, len(dropped), pool_experts):
            pool_ids = dropped[p0:p0 + pool_experts]
            pool = experts.unit_segments_into(pool_buf[:len(pool_ids) * h], pool_ids, components)
            cos = torch.mm(pool, kept_n.T, out=cos_buf[:pool.shape[0] * kept_n.shape[0]].view(pool.shape[0], -1))
            cos = cos.view(-1, len(block), h)
            # Clamp: cosines of identical vectors can round to just above 1, and alpha = 1 must move nothing.
            sim, best = cos.amax(dim=-1).clamp_(-1.0, 1.0).max(dim=-1)
            sim, best = sim.view(-1, h), best.view(-1, h) + k0
            rows = slice(p0, p0 + pool_experts)
            better = sim > best_sim[rows]  # strict: an earlier (lower) kept expert wins a tie
            best_sim[rows] = torch.where(better, sim, best_sim[rows])
            target[rows] = torch.where(better, best, target[rows])
    return target, best_sim


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


