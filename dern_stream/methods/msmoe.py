"""M-SMoE (Li et al. 2024, "Merge, Then Compress"), without its low-rank step, as the DERN paper runs it: the K most
frequently used experts dominate; every other expert joins the dominant one whose router logits on the cached
inputs are most similar, and each group is merged frequency-weighted after permutation alignment
(experts/merging.py)."""

from __future__ import annotations

from collections.abc import Iterator

from .base import Candidate, LayerWork, Method


class MSMoE(Method):
    name = "msmoe"
    rank = 3
    summary = "merge every expert into the most used expert of most similar routing (M-SMoE)"
    keeps_from_outputs = True

    def candidates(self, work: LayerWork) -> Iterator[Candidate]:
        from ..experts.merging import msmoe_layer

        statistics = work.statistics
        with work.clock("cluster"):
            result = msmoe_layer(work.experts, work.router, statistics, work.options.experts, work.groups)
        yield self.name, result


METHOD = MSMoE()
