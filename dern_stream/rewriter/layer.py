"""One MoE layer compressed on the compute device: the method's candidates built from the plan's ranking and, where
the options fit on the cached inputs, the best of them chosen and refitted (fit/choice.py). Reading and writing
the layer's tensors: layer_io.py; the three threads that overlap them with this: pipeline.py."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..experts.forward import Gating, LayerRouting
from ..experts.segments import ExpertStack
from ..families import Family, GroupPlan
from ..fit.choice import LayerFit
from ..fit.rows import FitRows
from ..layout.moe_layers import ModelShape
from ..methods import LayerWork, layer_candidates, method_named
from ..options import RewriteOptions
from ..runtime.stage_clock import NO_CLOCK, StageClock
from .layer_io import LayerInputs
from .layer_report import LayerReport, LayerSelection

# Fits the layer's options on `FitRows` (the caller's: from the dump, or the sequential forward) when given.
FitSource = Callable[[torch.Tensor, "torch.Tensor | None", Gating, "ExpertStack"], FitRows]


def compress_layer(
    inputs: LayerInputs,
    selection: LayerSelection,
    family: Family,
    shape: ModelShape,
    rows: FitSource | None,
    groups: GroupPlan | None,
    options: RewriteOptions,
    device: torch.device,
    routing: LayerRouting,
    clock: StageClock = NO_CLOCK,
    then: Callable[[Callable[[torch.Tensor], torch.Tensor]], None] | None = None,
) -> LayerReport:
    """The layer as the options build it from its ranking (`selection`, made by the plan), on `device`, with only
    the result leaving it (in the checkpoint's dtype). `rows(router, bias, gating, experts)`: the layer's fitting rows
    (None for a layer without cached inputs: the method's first candidate is then taken, unchecked).
    `then(replace)`: see LayerFit.finish (sequential.py)."""
    router = inputs.router.to(device)
    bias = inputs.bias.to(device) if inputs.bias is not None else None
    routing = inputs.layer_routing(routing, device)  # (the layer's zero experts and router input scale)
    experts = inputs.experts(device) if inputs.experts is not None else None
    fit: dict = {}
    data = None
    if rows is not None and options.fits_layers(shape.num_experts, shape.intermediate):
        with clock("fit"):
            data = rows(router, bias, routing.before, experts)
            fit["fit_tokens"] = int(data.x.shape[0]) - data.held
            if data.held:
                fit["held_out_tokens"] = data.held
    # The baselines' statistics use every row: they pick the experts, which the held-out rows do not judge.
    work = LayerWork(experts, router, bias, selection.scores, selection.kept, data.x if data is not None else None,
                     groups, options, routing, clock)
    candidates = layer_candidates(method_named(options.method), work)
    if data is None:
        _, best = next(candidates)
    else:
        layer_fit = LayerFit(data, router, bias, experts, family, shape, options, routing, clock, fit)
        best = layer_fit.finish(layer_fit.choose(candidates), then)
    del work, experts
    scores = selection.scores.tolist() if selection.scores is not None else []
    return LayerReport(inputs.layer.index, scores, selection.source, selection.tokens, best, fit)
