"""REAP (Lasby et al. 2025): keep the K experts with the largest saliency, the mean over the tokens routed to an
expert of its router score (before renormalisation) times the norm of its output, and drop the rest."""

from __future__ import annotations

from collections.abc import Iterator

from .base import Candidate, LayerWork, Method


class Reap(Method):
    name = "reap"
    rank = 2
    summary = "keep the K experts of largest REAP saliency (router score x output norm), drop the rest"
    keeps_from_outputs = True

    def candidates(self, work: LayerWork) -> Iterator[Candidate]:
        from ..experts.importance import select_experts
        from ..experts.result import prune_layer

        statistics = work.statistics
        with work.clock("cluster"):
            kept = select_experts(statistics.reap, work.options.experts, work.groups)
            result = prune_layer(work.router, kept, work.router.shape[0])
        yield self.name, result


METHOD = Reap()
