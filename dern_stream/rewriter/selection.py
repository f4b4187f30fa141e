"""Stage 1 for every layer, as the plan decides it: each layer's experts ranked by their routing on the cached
inputs (or by router norm), and the ones kept."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..calib import CalibDump
from ..checkpoint import Checkpoint
from ..experts.forward import Gating, LayerRouting
from ..experts.importance import router_norm_importance, routing_importance, select_experts
from ..families import Family, GroupPlan
from ..layout.moe_layers import ModelShape, MoELayer
from ..methods import method_named
from ..options import RewriteOptions
from .layer_io import read_layer
from .layer_report import NOT_NEEDED, ROUTER_NORM, ROUTING, LayerSelection


def layer_importance(dump: CalibDump, index: int, router: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """Routing statistics (Eq. 1) of layer `index` over all its cached inputs: (scores on the CPU, tokens), routed by
    the layer's `gating` (LayerInputs.layer_routing: its zero experts and its router's input scale). The router (and
    bias) move to `device` unless they are there already."""
    router, bias = router.to(device), bias.to(device) if bias is not None else None
    return routing_importance(dump.chunks(index, device), lambda x: gating.scores(x, router, bias), router.shape[0])


def select_experts_of_layers(ckpt: Checkpoint, family: Family, layers: list[MoELayer], shape: ModelShape,
                             dump: CalibDump | None, options: RewriteOptions, routing: LayerRouting,
                             groups: GroupPlan | None, device: torch.device, ranked: bool,
                             progress: bool) -> dict[int, LayerSelection]:
    """Every layer's ranking (on the compute device, as the executor would compute it) and kept experts."""
    n = family.num_experts(ckpt.config)
    chooses_later = method_named(options.method).keeps_from_outputs
    available = set(dump.attrs.get("moe_layers") or []) if dump is not None else set()
    out: dict[int, LayerSelection] = {}
    for layer in tqdm(layers, desc="rank experts", unit="layer", disable=not progress or not ranked):
        if not ranked:
            out[layer.index] = LayerSelection(None, 0, NOT_NEEDED, list(range(n)))
            continue
        inputs = read_layer(ckpt, family, layer, shape, with_experts=False)
        gating = inputs.layer_routing(routing).before
        if layer.index in available:
            scores, tokens = layer_importance(dump, layer.index, inputs.router, inputs.bias, gating, device)
            source = ROUTING
        else:  # (the rows as they act on the experts' input: Gemma 4's scaled by its router's input scale)
            scores, tokens, source = router_norm_importance(gating.router_input(inputs.router.float())), 0, ROUTER_NORM
        kept = None if chooses_later else select_experts(scores, options.experts, groups)
        out[layer.index] = LayerSelection(scores, tokens, source, kept)
    return out
