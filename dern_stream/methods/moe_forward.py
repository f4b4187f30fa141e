"""A MoE layer's routed experts run on cached inputs, without transformers.

The baselines (REAP saliency, HC-SMoE features), the per-layer choice and the least-squares refit
all need what a layer outputs on the calibration inputs; this computes it from the raw tensors
with the family's own routing (moe-layouts.md, "Routing"). Shared experts are left out: they are
unchanged by every method, so they cancel in any output difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DernError
from ..families.base import Router
from .segments import ExpertStack

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass(frozen=True)
class Gating:
    """Routing as the model applies it: selection, then scores renormalised over A(x) (or not), times a scale."""

    router: Router
    renormalise: bool
    scale: float
    act: str = "silu"
    input_scaled: bool = False  # the weight scales the expert's input (Llama-4), not its output

    def weights(self, x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None):
        """(selected experts [T, k], combine weights [T, k]) for inputs x [T, d]."""
        idx, scores = self.router.select(x @ router_weight.float().T, bias)
        if self.renormalise:
            scores = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return idx, scores * self.scale

    def activation(self):
        if self.act not in _ACTIVATIONS:
            raise DernError(f"hidden_act {self.act!r} is not supported by the output-error options")
        return _ACTIVATIONS[self.act]


class EvenSample:
    """At most `limit` of a layer's `total` cached inputs, evenly spaced, collected from chunks as they
    stream past (so the importance pass over the dump also yields the sample: one read per layer)."""

    def __init__(self, total: int, limit: int):
        self.stride = max(1, -(-total // limit))
        self.limit = limit
        self.kept: list[torch.Tensor] = []
        self.seen = 0

    def watch(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for chunk in chunks:
            first = (-self.seen) % self.stride  # first index in this chunk that is a multiple of stride overall
            part = chunk[first::self.stride]
            self.kept.append(part.clone() if self.stride > 1 else part)  # a strided view keeps the whole chunk
            self.seen += chunk.shape[0]
            yield chunk

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.kept)[:self.limit]


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """act(x W_g^T) * (x W_u^T): the expert's h neuron activations, [T, h] (weights taken to float32)."""
    return act(x @ gate.float().T) * (x @ up.float().T)


def expert_output(x: torch.Tensor, experts: ExpertStack, e: int, act) -> torch.Tensor:
    """E_e(x) = W_d (act(W_g x) * (W_u x)) for inputs x [T, d]; float32 [T, d]."""
    return expert_hidden(x, experts.gate[e], experts.up[e], act) @ experts.down[e].float().T


def routed_features(x: torch.Tensor, w: torch.Tensor, experts: ExpertStack, e: int, gating: Gating,
                    act) -> torch.Tensor:
    """What expert e's down projection turns into its weighted contribution, for the tokens x [T, d]
    routed to it with weights w [T]: w a_e(x), or a_e(w x) when the weight scales the input. [T, h] float32."""
    if gating.input_scaled:
        return expert_hidden(x * w[:, None], experts.gate[e], experts.up[e], act)
    return expert_hidden(x, experts.gate[e], experts.up[e], act) * w[:, None]


def routed_output(x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                  experts: ExpertStack) -> torch.Tensor:
    """sum over selected experts e of w_e(x) E_e(x), for x [T, d]; float32 [T, d]."""
    idx, w = gating.weights(x, router_weight, bias)
    act = gating.activation()
    out = torch.zeros_like(x)
    for e in range(experts.gate.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            feats = routed_features(x[tok], w[tok, slot], experts, e, gating, act)
            out.index_add_(0, tok, feats @ experts.down[e].float().T)
    return out


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| over all tokens (0 when both are 0)."""
    ref = float(torch.linalg.vector_norm(reference.double()))
    diff = float(torch.linalg.vector_norm((y - reference).double()))
    return diff / ref if ref > 0 else diff


@dataclass
class ExpertStats:
    """Per-expert statistics of the original layer on the calibration inputs."""

    frequency: torch.Tensor  # [N] fraction of tokens that select the expert
    reap: torch.Tensor  # [N] REAP saliency: mean over routed tokens of ||w_e(x) E_e(x)|| (of E_e(w_e x) for Llama-4)
    mean_output: torch.Tensor  # [N, d] mean of E_e(x) over all tokens (HC-SMoE's clustering feature)
    router_logits: torch.Tensor  # [N, T] router logits (M-SMoE's similarity feature)


def expert_stats(x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                 experts: ExpertStack) -> ExpertStats:
    idx, w = gating.weights(x, router_weight, bias)
    act = gating.activation()
    n = experts.gate.shape[0]
    freq = torch.zeros(n, dtype=torch.float64, device=x.device)
    reap = torch.zeros(n, dtype=torch.float64, device=x.device)
    mean_out = torch.zeros(n, x.shape[1], dtype=torch.float64, device=x.device)
    for e in range(n):
        y = expert_output(x, experts, e, act)  # every token: HC-SMoE's feature averages over all of them
        mean_out[e] = y.double().mean(dim=0)
        tok, slot = (idx == e).nonzero(as_tuple=True)
        freq[e] = tok.numel() / x.shape[0]
        if tok.numel():
            routed = routed_features(x[tok], w[tok, slot], experts, e, gating, act) @ experts.down[e].float().T
            reap[e] = torch.linalg.vector_norm(routed.double(), dim=-1).mean()
    logits = (x @ router_weight.float().T).T
    return ExpertStats(freq.cpu(), reap.cpu(), mean_out.float(), logits)
