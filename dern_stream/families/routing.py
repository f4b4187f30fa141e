"""Top-k routing as each family computes it, for Stage 1 importance (docs/method.md, Stage 1). The rules are plain
records (family records name them, and the command line's checks read those without torch); `select` imports torch.

Each router returns the selected experts A(x) and their scores G(x) before any
renormalisation or scaling: Eq. 1 divides by the sum over A(x) itself, so a family's
`norm_topk_prob` or `routed_scaling_factor` cancels and is not applied here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SoftmaxTopK:
    """Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 `greedy`: p = softmax(z), A = top-k of p."""

    top_k: int

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        return idx, weights


@dataclass(frozen=True)
class SoftmaxGroupLimited:
    """DeepSeek-V2 `group_limited_greedy`: only the topk_group groups with the largest max p compete."""

    top_k: int
    n_group: int
    topk_group: int

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        probs = torch.softmax(logits.float(), dim=-1)
        group_scores = probs.view(probs.shape[0], self.n_group, -1).amax(dim=-1)
        masked = probs.masked_fill(~_group_mask(group_scores, self.topk_group, probs.shape[-1]), 0.0)
        weights, idx = torch.topk(masked, self.top_k, dim=-1)
        return idx, weights


@dataclass(frozen=True)
class SigmoidGroupLimited:
    """DeepSeek-V3 `noaux_tc`: s = sigmoid(z), choose on s + correction bias within the best groups
    (group score = sum of its top-2 choice values); the scores are s, not the biased choice values."""

    top_k: int
    n_group: int
    topk_group: int

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        scores = torch.sigmoid(logits.float())
        choice = scores if bias is None else scores + bias.float()
        per_group = choice.view(choice.shape[0], self.n_group, -1)
        group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(group_scores, self.topk_group, choice.shape[-1]), float("-inf"))
        idx = torch.topk(choice, self.top_k, dim=-1).indices
        return idx, scores.gather(1, idx)


@dataclass(frozen=True)
class SoftmaxOverTopLogits:
    """Granite without a bias, gpt-oss with its router bias in the logits: A = top-k of z (+ b), scores a
    softmax over those k logits."""

    top_k: int

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        z = logits.float() if bias is None else logits.float() + bias.float()
        values, idx = torch.topk(z, self.top_k, dim=-1)
        return idx, torch.softmax(values, dim=-1)


@dataclass(frozen=True)
class SigmoidTopK:
    """Llama-4: A = top-k of z, scores sigmoid(z_A) (which scale the experts' inputs)."""

    top_k: int

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        values, idx = torch.topk(logits.float(), self.top_k, dim=-1)
        return idx, torch.sigmoid(values)


@dataclass(frozen=True)
class SoftmaxBiasedChoice:
    """ERNIE-4.5: p = softmax(z); A = top-k of p + correction bias; the scores are p (not the biased values)."""

    top_k: int

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        probs = torch.softmax(logits.float(), dim=-1)
        choice = probs if bias is None else probs + bias.float()
        idx = torch.topk(choice, self.top_k, dim=-1).indices
        return idx, probs.gather(1, idx)


@dataclass(frozen=True)
class SparseMixer:
    """PhiMoE's sparsemixer at inference, always two experts: the first is argmax z, weighted by the softmax
    over the logits within a relative `2 * jitter` of the max; the second the same with the first masked."""

    jitter: float
    top_k: int = 2

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        z = logits.float()
        picks, weights, masked = [], [], z
        for _ in range(2):
            top, idx = masked.max(dim=-1, keepdim=True)
            far = (top - z) / z.abs().clamp(min=top) > 2 * self.jitter
            weights.append(torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1).gather(1, idx))
            picks.append(idx)
            masked = z.scatter(1, idx, float("-inf"))
        return torch.cat(picks, dim=-1), torch.cat(weights, dim=-1)


def softmax_top_k(config: dict) -> SoftmaxTopK:
    """The common router: softmax over all experts, top num_experts_per_tok."""
    return SoftmaxTopK(config["num_experts_per_tok"])


def _group_mask(group_scores: torch.Tensor, topk_group: int, n_experts: int) -> torch.Tensor:
    """[T, N] bool mask of the experts in each token's topk_group best groups (groups are contiguous)."""
    import torch

    tokens, n_group = group_scores.shape
    top_groups = torch.topk(group_scores, topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
    return mask.unsqueeze(-1).expand(tokens, n_group, n_experts // n_group).reshape(tokens, n_experts)
