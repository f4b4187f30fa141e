"""The one interface every method implements (docs/architecture.md, "Adding a method").

A method turns one MoE layer, on the compute device, into candidates (label, LayerResult); the layer rewrite judges
them on the cached inputs and refits the chosen one (fit/). What the rest of the tool needs to know before any
tensor exists, a method declares as class attributes: the options check them, the plan decides from them whether
the experts are ranked up front, and the estimates ask each method for its own compute.

Method modules are imported by the command line's checks, which run before torch loads: a method imports its
computation (experts/) inside the functions that run it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from ..experts.forward import ExpertStats, LayerRouting
    from ..experts.result import LayerResult
    from ..experts.segments import ExpertStack
    from ..families import GroupPlan
    from ..layout.moe_layers import ModelShape
    from ..options import RewriteOptions
    from ..runtime.stage_clock import StageClock

Candidate = tuple[str, "LayerResult"]  # (label in the audit record, the layer as this setting builds it)


@dataclass
class LayerWork:
    """One MoE layer as a method sees it, everything on the compute device."""

    experts: ExpertStack | None  # the routed experts as stored; None when the options read no expert weight
    router: torch.Tensor  # [N, d]
    bias: torch.Tensor | None  # the router's score-correction bias (or, gpt-oss, its logits' bias)
    scores: torch.Tensor | None  # Stage 1's importance S [N], from the plan
    kept: list[int] | None  # the experts the plan keeps; None for a method that keeps from the layer's outputs
    rows: torch.Tensor | None  # the layer's cached inputs used for fitting (all of them); None without a dump
    groups: GroupPlan | None  # how the kept experts sit in routing groups (DeepSeek)
    options: RewriteOptions
    routing: LayerRouting
    clock: StageClock

    @cached_property
    def statistics(self) -> ExpertStats:
        """Each expert's statistics on the cached inputs (frequency, router logits, mean output, REAP saliency)."""
        from ..experts.forward import expert_stats

        with self.clock("fit"):
            return expert_stats(self.rows, self.router, self.bias, self.routing.before, self.experts)


class Method:
    """A way to build a layer's K experts. Subclasses set the class attributes and `candidates`."""

    name: ClassVar[str]
    rank: ClassVar[int]  # where it is listed (the command line's help, error messages): the default first
    summary: ClassVar[str]  # one line: what it does
    # It chooses its experts from statistics of the layer's outputs on the cached inputs, when the layer runs (the
    # plan cannot rank them up front); it needs a dump, and a layer without cached inputs falls back to pruning.
    keeps_from_outputs: ClassVar[bool] = False
    # It rebuilds experts neuron by neuron: alpha, --alpha-candidates and --intermediate-size apply to it.
    recombines_neurons: ClassVar[bool] = False

    def reads_expert_weights(self, options: RewriteOptions, num_experts: int) -> bool:
        """Whether the method itself computes from expert weights, beyond the layer's outputs on the cached inputs
        (which the options read whenever they use them). When nothing reads them, kept experts are copied as raw
        bytes and the rest never leave the disk."""
        return False

    def candidates(self, work: LayerWork) -> Iterator[Candidate]:
        """Every setting the options ask this method to try on the layer, built one at a time."""
        raise NotImplementedError

    def compute_gflop(self, shape: ModelShape, options: RewriteOptions) -> tuple[float, float]:
        """Upper bounds, in GFLOP per layer, of the method's own work beyond Stage 1 and the fit: (reassignment,
        clustering or merging)."""
        return 0.0, 0.0


def layer_candidates(method: Method, work: LayerWork) -> Iterator[Candidate]:
    """The method's candidates; plain pruning by S where the method keeps from the layer's outputs and the layer
    has no cached inputs (a multi-token-prediction layer)."""
    if method.keeps_from_outputs and work.rows is None:
        from ..experts.importance import select_experts
        from ..experts.result import prune_layer

        kept = select_experts(work.scores, work.options.experts, work.groups)
        yield "prune", prune_layer(work.router, kept, work.router.shape[0])
        return
    yield from method.candidates(work)
