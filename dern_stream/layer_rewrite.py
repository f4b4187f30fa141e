"""One MoE layer, start to finish: load its router and experts, score, compress, write."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calib import CalibDump
from .checkpoint import Checkpoint, ShardedWriter
from .checkpoint.safetensors_format import DTYPES
from .families import PARTS, Family, GroupPlan
from .layout import ModelShape, MoELayer
from .methods import ExpertStack, LayerResult, dern_layer, router_norm_importance, routing_importance, select_experts
from .options import RewriteOptions


@dataclass
class LayerReport:
    index: int
    importance: list[float]
    importance_source: str  # "routing" or "router-norm"
    tokens: int
    result: LayerResult


def load_experts(
    ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, device: torch.device
) -> ExpertStack:
    """All routed experts of one layer as float32 on `device`, filled in place (no second full copy)."""
    n, d, h = shape.num_experts, shape.hidden, shape.intermediate
    stack = ExpertStack(
        torch.empty(n, h, d, device=device), torch.empty(n, h, d, device=device), torch.empty(n, d, h, device=device)
    )
    for e in range(n):
        for part in PARTS:
            getattr(stack, part)[e].copy_(ckpt.load(family.expert_name(layer.index, e, part)))
    return stack


def compress_layer(
    ckpt: Checkpoint,
    family: Family,
    layer: MoELayer,
    shape: ModelShape,
    dump: CalibDump | None,
    groups: GroupPlan | None,
    options: RewriteOptions,
    device: torch.device,
) -> LayerReport:
    router = ckpt.load(family.router_name(layer.index)).to(device)
    bias = ckpt.load(family.bias_name(layer.index)).to(device) if layer.bias is not None else None
    if dump is not None:
        scores, tokens = routing_importance(dump.chunks(layer.index, device), router, family.make_router(ckpt.config),
                                            bias)
        source = "routing"
    else:
        scores, tokens, source = router_norm_importance(router), 0, "router-norm"
    kept = select_experts(scores, options.experts, groups)
    experts = load_experts(ckpt, family, layer, shape, device)
    result = dern_layer(experts, router, scores, kept, options)
    del experts
    return LayerReport(layer.index, scores.tolist(), source, tokens, result)


def write_layer(
    writer: ShardedWriter, ckpt: Checkpoint, family: Family, layer: MoELayer, report: LayerReport
) -> None:
    """Router rows, score-correction bias and experts renumbered 0..K-1 in kept order.

    Experts that DERN left unchanged are copied as raw bytes, so they are bit-identical to the input.
    """
    result, i = report.result, layer.index
    writer.write(family.router_name(i), result.router.cpu())
    if layer.bias is not None:
        # A load-balancing term, not a routing weight: the kept experts keep their values (method.md).
        writer.write(family.bias_name(i), ckpt.load(family.bias_name(i))[result.kept])
    dtype = DTYPES[layer.dtype]
    for pos, (expert, rebuilt) in enumerate(zip(result.kept, result.experts, strict=True)):
        for part in PARTS:
            name = family.expert_name(i, pos, part)
            if rebuilt is None:
                writer.copy_raw(name, ckpt.entries[family.expert_name(i, expert, part)])
            else:
                writer.write(name, getattr(rebuilt, part).to(dtype).cpu())
