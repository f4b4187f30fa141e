"""DERN (Zhou et al.): dropped experts' neurons move to the kept expert holding their most similar neuron, the
router rows follow (Eq. 8), and each kept expert that received neurons is clustered back to its width
(docs/method.md, Stages 2 and 3; the computation: experts/recombine.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .base import Candidate, LayerWork, Method

if TYPE_CHECKING:
    from ..experts.recombine import DernParams
    from ..layout.moe_layers import ModelShape
    from ..options import RewriteOptions


class Dern(Method):
    name = "dern"
    rank = 0
    summary = "drop experts and recombine their neurons into the kept ones (the paper's method)"
    recombines_neurons = True

    def reads_expert_weights(self, options: RewriteOptions, num_experts: int) -> bool:
        """Only when a neuron can move: with K = N, or alpha = 1 (cosines never exceed 1), DERN is pruning."""
        return options.experts < num_experts and options.alpha < 1.0

    def candidates(self, work: LayerWork) -> Iterator[Candidate]:
        """One layer per alpha (`--alpha-candidates`, else `--alpha`)."""
        from ..experts.recombine import dern_layer
        from ..experts.result import prune_layer

        options = work.options
        for alpha in options.alpha_candidates or (options.alpha,):
            if work.experts is None:  # the options showed nothing can move: DERN reduces to pruning, unread
                yield f"dern@{alpha:g}", prune_layer(work.router, work.kept, work.router.shape[0])
            else:
                yield f"dern@{alpha:g}", dern_layer(work.experts, work.router, work.scores, work.kept,
                                                    dern_params(options, alpha), work.clock)

    def compute_gflop(self, shape: ModelShape, options: RewriteOptions) -> tuple[float, float]:
        """Every pooled segment compared with every kept one; every k-means iteration run."""
        n, k, h, d = shape.num_experts, options.experts, shape.intermediate, shape.hidden
        width = options.intermediate_size or h
        sim = len(options.sim_components) * d
        moves = k < n and options.alpha < 1.0
        reassign = 2 * (n - k) * h * k * h * sim if moves else 0
        members = h + ((n - k) * h / k if moves else 0)
        clusters = moves or width < h
        cluster = options.kmeans_iters * 2 * k * members * width * sim if clusters else 0
        return reassign / 1e9, cluster / 1e9


def dern_params(options: RewriteOptions, alpha: float | None = None) -> DernParams:
    """The DERN part of the options, with `alpha` instead of the option's if given."""
    from ..experts.recombine import DernParams

    return DernParams(options.alpha if alpha is None else alpha, options.sim_components, options.kmeans_iters,
                      options.kmeans_init, options.router_transfer, options.intermediate_size,
                      options.similarity_block_bytes)


METHOD = Dern()
