"""Plain pruning: keep the K experts with the largest routing importance S (Eq. 1) and drop the rest, unchanged (the
DERN paper's Stage 1 alone; the expert-dropping baseline)."""

from __future__ import annotations

from collections.abc import Iterator

from .base import Candidate, LayerWork, Method


class Prune(Method):
    name = "prune"
    rank = 1
    summary = "keep the K most important experts, drop the rest"

    def candidates(self, work: LayerWork) -> Iterator[Candidate]:
        from ..experts.result import prune_layer

        yield "prune", prune_layer(work.router, work.kept, work.router.shape[0])


METHOD = Prune()
