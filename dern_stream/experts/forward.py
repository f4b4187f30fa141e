"""A MoE layer's routed experts run on cached inputs, without transformers.

The baselines (REAP saliency, HC-SMoE features), the per-layer choice and the least-squares refit
all need what a layer outputs on the calibration inputs; this computes it from the raw tensors
with the family's own routing (docs/method.md, "Notation"). Shared experts are left out: they are
unchanged by every method, so they cancel in any output difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import DernError
from ..families import Family
from ..families.record import Router
from .segments import ExpertStack

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
                "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}
# One expert's rows are computed a block at a time, so the activations held do not grow with the fit sample: a
# Mixtral-8x7B expert taking all of 131072 rows would otherwise hold 22.5 GB of them (docs/performance.md, "The fit on
# large layers").
ACTIVATION_BLOCK_BYTES = 2**30


def row_block(width: int, hidden: int) -> int:
    """Rows of one expert computed together: their gate and up activations and features (`width` floats each)
    and four row-sized copies (`hidden` each), float32, within ACTIVATION_BLOCK_BYTES."""
    return max(1, ACTIVATION_BLOCK_BYTES // (4 * (3 * width + 4 * hidden)))


def routed_rows(idx: torch.Tensor, e: int, block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, their slot in `idx`) of the rows routed to expert e, in blocks of at most `block` rows."""
    tok, slot = (idx == e).nonzero(as_tuple=True)
    for start in range(0, tok.numel(), block):
        yield tok[start:start + block], slot[start:start + block]


@dataclass(frozen=True)
class Gating:
    """Routing as the model applies it: selection, then scores renormalised over A(x) (or not), times a scale."""

    router: Router
    renormalise: bool
    scale: float
    act: str = "silu"
    input_scaled: bool = False  # the weight scales the expert's input (Llama-4), not its output
    glu: Callable | None = None  # glu(g, u) when the family's experts do not compute act(g) * u (gpt-oss)
    # A layer's zero-computation experts (LongCat-Flash): their router rows [Z, d] and correction-bias entries [Z],
    # scored after the routed experts' (indices N.. in the selection); each returns its input, times its weight.
    passive_rows: torch.Tensor | None = field(default=None, compare=False)
    passive_bias: torch.Tensor | None = field(default=None, compare=False)
    # The layer's router reads the experts' input x times this [d] vector (Gemma 4: families/record.RouterInput).
    input_scale: torch.Tensor | None = field(default=None, compare=False)

    def with_input_scale(self, scale: torch.Tensor | None) -> Gating:
        """This routing for a layer whose router reads x * scale (None: unchanged)."""
        return self if scale is None else replace(self, input_scale=scale)

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the router's rows multiply, for the experts' inputs x [T, d] (float32)."""
        return x if self.input_scale is None else x * self.input_scale.to(x.device, torch.float32)

    def with_passive(self, rows: torch.Tensor | None, bias: torch.Tensor | None) -> Gating:
        """This routing for a layer whose router also scores the zero experts `rows` (None or empty: unchanged)."""
        if rows is None or rows.shape[0] == 0:
            return self
        return replace(self, passive_rows=rows, passive_bias=bias)

    def scores(self, x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None):
        """(selected experts [T, k], the router's scores of them [T, k]: before renormalisation and scaling; on
        Mixtral the softmax probabilities over all N experts). A zero expert is selected as N + its index."""
        if self.passive_rows is not None:
            rows = self.passive_rows.to(router_weight.device, router_weight.dtype)
            router_weight = torch.cat([router_weight, rows])
            if bias is not None:
                bias = torch.cat([bias, self.passive_bias.to(bias.device, bias.dtype)])
        return self.router.select(self.router_input(x) @ router_weight.float().T, bias)

    def weights(self, x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None):
        """(selected experts [T, k], combine weights [T, k]) for inputs x [T, d]."""
        idx, scores = self.scores(x, router_weight, bias)
        if self.renormalise:
            scores = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return idx, scores * self.scale

    def activation(self) -> Callable:
        """glu(g, u): an expert's neuron activations from its gate and up projections."""
        if self.glu is not None:
            return self.glu
        if self.act not in _ACTIVATIONS:
            raise DernError(f"hidden_act {self.act!r} is not supported by the output-error options")
        act = _ACTIVATIONS[self.act]
        return lambda g, u: act(g) * u


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


def expert_hidden(x: torch.Tensor, experts: ExpertStack, e: int, glu) -> torch.Tensor:
    """glu(x W_g^T + b_g, x W_u^T + b_u): expert e's h neuron activations, [T, h] (weights taken to float32)."""
    g, u = x @ experts.weight("gate", e).float().T, x @ experts.weight("up", e).float().T
    if experts.bias is not None:
        g, u = g + experts.bias[e, :, 0].float(), u + experts.bias[e, :, 1].float()
    return glu(g, u)


def expert_output(x: torch.Tensor, experts: ExpertStack, e: int, glu) -> torch.Tensor:
    """E_e(x) = W_d a_e(x) (+ b_d) for inputs x [T, d]; float32 [T, d]."""
    out = expert_hidden(x, experts, e, glu) @ experts.weight("down", e).float().T
    return out + experts.down_bias[e].float() if experts.down_bias is not None else out


def routed_features(x: torch.Tensor, w: torch.Tensor, experts: ExpertStack, e: int, gating: Gating,
                    glu) -> torch.Tensor:
    """What expert e's down projection turns into its weighted contribution, for the tokens x [T, d]
    routed to it with weights w [T]: w a_e(x), or a_e(w x) when the weight scales the input. [T, h] float32.
    (Experts without a down bias: refit's model of a layer.)"""
    if gating.input_scaled:
        return expert_hidden(x * w[:, None], experts, e, glu)
    return expert_hidden(x, experts, e, glu) * w[:, None]


def routed_contribution(x: torch.Tensor, w: torch.Tensor, experts: ExpertStack, e: int, gating: Gating,
                        glu) -> torch.Tensor:
    """w_e(x) E_e(x) (or E_e(w_e(x) x) when the weight scales the input) for the tokens x [T, d]; [T, d]."""
    if gating.input_scaled:
        return expert_output(x * w[:, None], experts, e, glu)
    return expert_output(x, experts, e, glu) * w[:, None]


def routed_output(x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                  experts: ExpertStack, members: range | None = None) -> torch.Tensor:
    """sum over selected experts e of w_e(x) E_e(x), for x [T, d]; float32 [T, d]. With `members`, the sum over
    those experts only, whose weights `experts` then holds (expert e at position e - members.start)."""
    idx, w = gating.weights(x, router_weight, bias)
    act = gating.activation()
    out = torch.zeros_like(x)
    if gating.passive_rows is not None and members is None:  # the zero experts' part: their weights times x
        out += x * w.masked_fill(idx < router_weight.shape[0], 0.0).sum(dim=-1, keepdim=True)
    block = row_block(experts.intermediate, x.shape[1])
    members = members if members is not None else range(experts.gate.shape[0])
    for e in members:
        for tok, slot in routed_rows(idx, e, block):
            out.index_add_(0, tok, routed_contribution(x[tok], w[tok, slot], experts, e - members.start, gating,
                                                       act))
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
    # [N] REAP saliency: mean over routed tokens of ||s_e(x) E_e(x)|| (of E_e(s_e x) for Llama-4), s_e the router's
    # score before renormalisation, as REAP's own code weights it (docs/method.md, "Baselines as their authors run
    # them").
    reap: torch.Tensor
    mean_output: torch.Tensor  # [N, d] mean of E_e(x) over all tokens (HC-SMoE's clustering feature)
    router_logits: torch.Tensor  # [N, T] router logits (M-SMoE's similarity feature)


def expert_stats(x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                 experts: ExpertStack) -> ExpertStats:
    idx, score = gating.scores(x, router_weight, bias)
    act = gating.activation()
    n = experts.gate.shape[0]
    freq = torch.zeros(n, dtype=torch.float64, device=x.device)
    reap = torch.zeros(n, dtype=torch.float64, device=x.device)
    mean_out = torch.zeros(n, x.shape[1], dtype=torch.float64, device=x.device)
    block = row_block(experts.intermediate, x.shape[1])
    for e in range(n):
        for start in range(0, x.shape[0], block):  # every token: HC-SMoE's feature averages over all of them
            mean_out[e] += expert_output(x[start:start + block], experts, e, act).double().sum(dim=0)
        mean_out[e] /= x.shape[0]
        routed = 0
        for tok, slot in routed_rows(idx, e, block):
            contribution = routed_contribution(x[tok], score[tok, slot], experts, e, gating, act)
            reap[e] += torch.linalg.vector_norm(contribution.double(), dim=-1).sum()
            routed += tok.numel()
        freq[e] = routed / x.shape[0]
        if routed:
            reap[e] /= routed
    logits = (gating.router_input(x) @ router_weight.float().T).T
    return ExpertStats(freq.cpu(), reap.cpu(), mean_out.float(), logits)


@dataclass(frozen=True)
class LayerRouting:
    """The family's routing as the model applies it, before (N experts) and after (K experts) the rewrite."""

    before: Gating
    after: Gating


def layer_routing(family: Family, config: dict, out_config: dict) -> LayerRouting:
    act = str(config.get("hidden_act", config.get("hidden_activation", "silu")))  # (Gemma's key: hidden_activation)

    def gating(c: dict) -> Gating:
        return Gating(family.make_router(c), family.renormalises(c), family.routed_scale(c), act,
                      family.scales_expert_input, family.make_glu(c) if family.make_glu else None)

    return LayerRouting(gating(config), gating(out_config))
