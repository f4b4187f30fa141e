"""One MoE layer, start to finish: load its router and experts, score, compress, write."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .calib import CalibDump
from .checkpoint import Checkpoint, ShardedWriter
from .checkpoint.safetensors_format import DTYPES
from .families import PARTS, Family, GroupPlan
from .layout import ModelShape, MoELayer
from .methods import (
    ExpertStack,
    LayerResult,
    RebuiltExpert,
    dern_layer,
    router_norm_importance,
    routing_importance,
    select_experts,
)
from .methods.baselines import hcsmoe_layer, msmoe_layer, prune_layer
from .methods.moe_forward import EvenSample, Gating, expert_stats, relative_error, routed_output
from .methods.refit import refit_down
from .options import RewriteOptions


@dataclass
class LayerReport:
    index: int
    importance: list[float]
    importance_source: str  # "routing" or "router-norm"
    tokens: int
    result: LayerResult
    # Output-error bookkeeping when the options use the cached inputs (choice, refit), else empty.
    fit: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LayerRouting:
    """The family's routing as the model applies it, before (N experts) and after (K experts) the rewrite."""

    before: Gating
    after: Gating


def layer_routing(family: Family, config: dict, out_config: dict) -> LayerRouting:
    act = str(config.get("hidden_act", "silu"))

    def gating(c: dict) -> Gating:
        return Gating(family.make_router(c), family.renormalises(c), family.routed_scale(c), act)

    return LayerRouting(gating(config), gating(out_config))


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
    routing: LayerRouting,
) -> LayerReport:
    router = ckpt.load(family.router_name(layer.index)).to(device)
    bias = ckpt.load(family.bias_name(layer.index)).to(device) if layer.bias is not None else None
    sample = None
    if dump is not None:
        chunks = dump.chunks(layer.index, device)
        if options.uses_layer_outputs:
            sample = EvenSample(dump.layer(layer.index).shape[0], options.fit_tokens)
            chunks = sample.watch(chunks)
        scores, tokens = routing_importance(chunks, router, routing.before.router, bias)
        source = "routing"
    else:
        scores, tokens, source = router_norm_importance(router), 0, "router-norm"
    experts = load_experts(ckpt, family, layer, shape, device)
    fit: dict = {}
    x = target = None
    if sample is not None:
        x = sample.tensor()
        target = routed_output(x, router, bias, routing.before, experts)
        fit["fit_tokens"] = int(x.shape[0])

    best: LayerResult | None = None
    for label, result in _candidates(experts, router, bias, scores, x, groups, options, routing):
        if x is None:
            best = result  # no cached inputs for this layer (an MTP layer): the first candidate, unchecked
            break
        kept_bias = bias[result.kept] if bias is not None else None
        stack = kept_stack(experts, result)
        error = relative_error(routed_output(x, result.router, kept_bias, routing.after, stack), target)
        entry = {"candidate": label, "error": error}
        if options.refit:
            refitted = refit_down(x, target, result.router, kept_bias, routing.after, stack, options.refit_ridge)
            _take_refit(result, stack, refitted)
            stack = refitted
            entry["error_after_refit"] = error = relative_error(
                routed_output(x, result.router, kept_bias, routing.after, stack), target)
        fit.setdefault("candidates", []).append(entry)
        if best is None or error < fit["error"]:
            best, fit["error"], fit["chosen"] = result, error, label
        del stack
    del experts
    return LayerReport(layer.index, scores.tolist(), source, tokens, best, fit)


def _candidates(experts, router, bias, scores, x, groups, options, routing):
    """(label, LayerResult) for every setting the options ask to try, built one at a time."""
    n = router.shape[0]
    if options.method == "dern":
        kept = select_experts(scores, options.experts, groups)
        for alpha in options.alpha_candidates or (options.alpha,):
            yield f"dern@{alpha:g}", dern_layer(experts, router, scores, kept, replace(options, alpha=alpha))
        return
    if options.method == "prune" or x is None:
        yield "prune", prune_layer(router, select_experts(scores, options.experts, groups), n)
        return
    stats = expert_stats(x, router, bias, routing.before, experts)
    if options.method == "reap":
        yield "reap", prune_layer(router, select_experts(stats.reap, options.experts, groups), n)
    elif options.method == "msmoe":
        yield "msmoe", msmoe_layer(experts, router, stats, options.experts, groups)
    else:
        yield "hcsmoe", hcsmoe_layer(experts, router, stats, options.experts, groups)


def kept_stack(experts: ExpertStack, result: LayerResult) -> ExpertStack:
    """The output layer's K experts as one stack: rebuilt weights, or the original expert's."""
    parts = {p: [] for p in PARTS}
    for expert, rebuilt in zip(result.kept, result.experts, strict=True):
        for p in PARTS:
            parts[p].append(getattr(rebuilt, p) if rebuilt is not None else getattr(experts, p)[expert])
    return ExpertStack(*(torch.stack(parts[p]) for p in PARTS))


def _take_refit(result: LayerResult, before: ExpertStack, after: ExpertStack) -> None:
    """Store refitted down projections; an expert the refit did not touch (no tokens) stays a raw copy."""
    for pos, rebuilt in enumerate(result.experts):
        if torch.equal(before.down[pos], after.down[pos]):
            continue
        if rebuilt is None:
            result.experts[pos] = RebuiltExpert(after.gate[pos], after.up[pos], after.down[pos])
        else:
            rebuilt.down = after.down[pos]


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
