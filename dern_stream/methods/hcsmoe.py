"""HC-SMoE (Chen et al. 2025): average-linkage clustering of the experts by their mean output on the cached inputs
into K clusters, each merged frequency-weighted (experts/merging.py)."""

from __future__ import annotations

from collections.abc import Iterator

from .base import Candidate, LayerWork, Method


class HCSMoE(Method):
    name = "hcsmoe"
    rank = 4
    summary = "cluster the experts by their mean output and merge each cluster (HC-SMoE)"
    keeps_from_outputs = True

    def candidates(self, work: LayerWork) -> Iterator[Candidate]:
        from ..experts.merging import hcsmoe_layer

        statistics = work.statistics
        with work.clock("cluster"):
            result = hcsmoe_layer(work.experts, work.router, statistics, work.options.experts, work.groups)
        yield self.name, result


METHOD = HCSMoE()
