"""One MoE layer in three steps, run on three threads by pipeline.py: read its tensors, compress, write."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from ..calib import CalibDump
from ..checkpoint import Checkpoint, NonFiniteTensor, ShardedWriter
from ..checkpoint.integrity import all_finite
from ..checkpoint.safetensors_format import DTYPES
from ..experts.forward import Gating, expert_stats, relative_error, routed_output
from ..experts.importance import routing_importance, select_experts
from ..experts.merging import hcsmoe_layer, msmoe_layer, prune_layer
from ..experts.recombine import LayerResult, RebuiltExpert, dern_layer
from ..experts.segments import ExpertStack, transfer_router
from ..families import PARTS, Family, GroupPlan
from ..fit.down_refit import refit_down
from ..fit.gradient_refit import held_out_judge, refit_gradient
from ..fit.router_refit import refit_router
from ..fit.rows import FitRows
from ..layout.fused_tensors import from_float, fused_tensors, to_float
from ..layout.moe_layers import ModelShape, MoELayer
from ..options import RewriteOptions
from ..runtime.stage_clock import NO_CLOCK, StageClock
from ..storage import ExpertStorage, dequantize, quantize
from ..storage.formats import SCALE_SUFFIX
from ..storage.reading import load_weight


@dataclass(frozen=True)
class LayerSelection:
    """How a layer's experts were ranked (by the plan), and which it keeps.

    `source`: "routing" (Eq. 1 over `tokens` cached inputs), "router-norm" (no cached inputs), or "not
    needed" (every expert kept and nothing rebuilt: no ranking is computed). `kept` is None for the
    baselines that choose from the layer's outputs (reap, msmoe, hcsmoe): decided when the layer runs."""

    scores: torch.Tensor | None  # [N] float64, on the CPU
    tokens: int
    source: str
    kept: list[int] | None


@dataclass
class LayerReport:
    index: int
    importance: list[float]
    importance_source: str  # LayerSelection.source
    tokens: int
    result: LayerResult
    # Output-error bookkeeping when the options use the cached inputs (choice, refit), else empty.
    fit: dict = field(default_factory=dict)
    requantization_error: float | None = None  # FP8: ||deq(q(W)) - W|| / ||W|| over the rebuilt experts


@dataclass(frozen=True)
class LayerRouting:
    """The family's routing as the model applies it, before (N experts) and after (K experts) the rewrite."""

    before: Gating
    after: Gating


def layer_routing(family: Family, config: dict, out_config: dict) -> LayerRouting:
    act = str(config.get("hidden_act", "silu"))

    def gating(c: dict) -> Gating:
        return Gating(family.make_router(c), family.renormalises(c), family.routed_scale(c), act,
                      family.scales_expert_input, family.make_glu(c) if family.make_glu else None)

    return LayerRouting(gating(config), gating(out_config))


@dataclass
class LayerInputs:
    """What the computation needs of one layer: router (and bias) in host memory, and the experts' bytes
    prefetched into the page cache and read on the computing thread (`experts` loads them)."""

    layer: MoELayer
    router: torch.Tensor
    bias: torch.Tensor | None
    experts: Callable[[torch.device], ExpertStack] | None  # None when the options never look at expert weights


def read_layer(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, with_experts: bool,
               clock: StageClock = NO_CLOCK) -> LayerInputs:
    """The layer's router (and bias); its experts are read later, by the computation (read_experts),
    from the page cache once Checkpoint.prefetch has brought them in."""
    with clock("read"):
        router = ckpt.load(family.router_name(layer.index))
        # [N], whether stored as [N] or [1, N] (ERNIE)
        bias = ckpt.load(family.bias_name(layer.index)).reshape(-1) if layer.bias is not None else None
    experts = partial(read_experts, ckpt, family, layer, shape, clock=clock) if with_experts else None
    return LayerInputs(layer, router, bias, experts)


def layer_importance(dump: CalibDump, index: int, router: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """Routing statistics (Eq. 1) of layer `index` over all its cached inputs: (scores on the CPU, tokens).
    The router (and bias) move to `device` unless they are there already."""
    bias = bias.to(device) if bias is not None else None
    return routing_importance(dump.chunks(index, device), router.to(device), gating.router, bias)


def read_experts(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, device: torch.device,
                 clock: StageClock = NO_CLOCK) -> ExpertStack:
    """The layer's routed experts as one stack on `device`, as stored: FP8 stays FP8 with its block scales
    (the methods dequantize what they read), MXFP4 is dequantized to bf16. Host memory: the stack itself on
    CPU; one tensor at a time (a staging buffer) for an accelerator."""
    stored, storage = DTYPES[layer.dtype], layer.storage
    with clock("read"):
        stack = ExpertStack.empty(shape.num_experts, shape.intermediate, shape.hidden,
                                  storage.compute_dtype(stored), device,
                                  biases=family.fused is not None and family.fused.biased, block=storage.block)
        if family.fused is not None:
            _read_fused(ckpt, family, layer, shape, stack)
            return stack
        staging: dict[tuple[int, ...], torch.Tensor] = {}  # one host buffer per tensor shape
        for e in range(shape.num_experts):
            for p, part in enumerate(PARTS):
                name, slot = family.expert_name(layer.index, e, part), getattr(stack, part)[e]
                if storage.fp8:
                    stack.scales[p][e].copy_(ckpt.load(name + SCALE_SUFFIX))
                if slot.device.type == "cpu":
                    ckpt.read_into(name, slot)
                    continue
                host = staging.get(tuple(slot.shape))
                if host is None:
                    host = staging[tuple(slot.shape)] = torch.empty(slot.shape, dtype=stored)
                ckpt.read_into(name, host)
                slot.copy_(host)  # synchronous from pageable memory: the buffer is free again after
    return stack


def _read_fused(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, stack: ExpertStack) -> None:
    """Fill `stack` from a fused layout: one pread per expert and tensor, through a host buffer of one slice
    (MXFP4: dequantized from it)."""
    for e in range(shape.num_experts):
        slices = _read_slices(ckpt, family, layer, shape.hidden, shape.intermediate, e)
        gate, up, down, bias, down_bias = family.fused.split(to_float(slices, layer.storage))
        for target, tensor in ((stack.gate, gate), (stack.up, up), (stack.down, down), (stack.bias, bias),
                               (stack.down_bias, down_bias)):
            if tensor is not None:
                target[e].copy_(tensor)


# Fits the layer's options on `FitRows` (the caller's: from the dump, or the sequential forward) when given.
FitSource = Callable[[torch.Tensor, "torch.Tensor | None", "ExpertStack"], FitRows]
ROUTER_RIDGE = 0.01  # --refit-router's ridge, relative to the mean Gram diagonal (README, "Quality")
RIDGE_FACTORS = (0.1, 0.3, 3.0)  # with --holdout, the down refit's ridge is also tried at these times --refit-ridge


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
    """Build every candidate the options ask for from the layer's ranking (`selection`, made by the
    plan), with every refit variant they ask for, and keep the one whose output is closest to the original
    layer's (on held-out rows when `options.holdout`), then move its projections by `options.refit_steps`
    gradient steps (as many as the held-out rows favour); all on `device`, with only the result leaving it (in
    the checkpoint's dtype). `rows(router, bias, experts)`: the layer's fitting rows (None for a layer
    without cached inputs). `then(replace)`: called with the chosen layer's output change
    (x -> new routed output - original) while the experts are still on the device (sequential.py)."""
    index = inputs.layer.index
    router = inputs.router.to(device)
    bias = inputs.bias.to(device) if inputs.bias is not None else None
    experts = inputs.experts(device) if inputs.experts is not None else None
    fit: dict = {}
    data = None
    if rows is not None and options.uses_layer_outputs:
        with clock("fit"):
            data = rows(router, bias, experts)
            fit["fit_tokens"] = int(data.x.shape[0]) - data.held
            if data.held:
                fit["held_out_tokens"] = data.held

    best = chosen = None
    pruned_seen = False
    # The baselines' statistics use every row: they pick the experts, which the held-out rows do not judge.
    all_x = data.x if data is not None else None
    for label, result in _candidates(experts, router, bias, selection, all_x, groups, options, routing, clock):
        if data is None:
            best = result  # no cached inputs for this layer (an MTP layer): the first candidate, unchecked
            break
        pruned = not result.segments_reassigned and all(e is None for e in result.experts)
        if pruned and pruned_seen:
            continue  # plain pruning again (an alpha that moved nothing): the same layer as before
        pruned_seen |= pruned
        with clock("fit"):
            kept_bias = output_bias(family, bias, result, shape.intermediate) if bias is not None else None
            stack = kept_stack(experts, result)
            x, y = data.judging()
            output = routed_output(x, result.router, kept_bias, routing.after, stack)
            error = relative_error(output, y)
            # Judged on the fitting rows themselves: the refit of the down projections starts from this output.
            current = output if not data.held else None
            del output
            # Nothing merged: every kept expert's target logit is its own, so a router refit changes nothing.
            variants = _variants(options, bool(data.held), merged=bool(result.segments_reassigned))
            ridges_tried = False
            while variants:
                variant = variants.pop(0)
                entry = {"candidate": label + variant.suffix, "error": error}
                new_router, new_stack = variant.fit(data.fitting(), router, result, kept_bias, stack, shape,
                                                    options, routing, current)
                judged = error
                if variant.refits:
                    judged = entry["error_after_refit"] = relative_error(
                        routed_output(x, new_router, kept_bias, routing.after, new_stack), y)
                fit.setdefault("candidates", []).append(entry)
                if best is None or judged < fit["error"]:
                    best, chosen, fit["error"], fit["chosen"] = result, variant, judged, entry["candidate"]
                    fitted = (kept_bias, stack, new_router, new_stack)
                del new_stack
                if not variants and data.held and chosen.down and best is result and not ridges_tried:
                    # The ridge too is chosen on the held-out rows, for the best setting found so far.
                    variants, ridges_tried = [replace(chosen, ridge=options.refit_ridge * f)
                                              for f in RIDGE_FACTORS], True
            del stack
    if data is not None:
        with clock("fit"):
            kept_bias, stack, new_router, new_stack = fitted
            del fitted
            steps = options.refit_steps
            if data.held and steps:
                steps = _held_out_steps(data, fit, steps, new_router, kept_bias, routing.after, new_stack,
                                        options.refit_group)
            if data.held:  # chosen on the held-out rows: the chosen variant is fitted again on all of them
                fit["error_on"] = "held-out rows"
                new_router, new_stack = chosen.fit((data.x, data.target), router, best, kept_bias, stack, shape,
                                                   options, routing)
            if any(_as_list(steps)):
                tuned, _ = refit_gradient(data.x, data.target, new_router, kept_bias, routing.after, new_stack, steps,
                                          group=options.refit_group)
                if data.held:
                    new_stack = tuned
                else:  # judged on the rows it was fitted on, as the other refits are without a holdout
                    error = relative_error(routed_output(data.x, new_router, kept_bias, routing.after, tuned),
                                           data.target)
                    lowered = error < fit["error"]  # (minibatch steps may not lower the error on all the rows)
                    fit["error_after_gradient"] = error
                    _record_steps(fit, steps if lowered else 0)
                    if lowered:
                        new_stack, fit["error"] = tuned, error
                del tuned
            best.router = new_router
            _take_refit(best, stack, new_stack)
            if then is not None:  # the layer as written: refitted projections in the experts' dtype
                written = ExpertStack(*(getattr(new_stack, p).to(stack.dtype) for p in PARTS))
                then(_output_change(router, bias, routing, experts, best.router, kept_bias, written))
    del experts
    scores = selection.scores.tolist() if selection.scores is not None else []
    return LayerReport(index, scores, selection.source, selection.tokens, best, fit)


def _held_out_steps(data: FitRows, fit: dict, steps: int, router, bias, gating: Gating, stack: ExpertStack,
                    group: int | None) -> list[int]:
    """The number of gradient steps (at most `steps`) of each group of experts (one group without `group`) after
    which the chosen setting, fitted on the fitting rows, is best on the held-out rows; recorded in `fit`."""
    held = data.judging()
    tuned, taken = refit_gradient(*data.fitting(), router, bias, gating, stack, steps, held, group)
    _record_steps(fit, taken)
    if any(taken):
        fit["error"] = fit["error_after_gradient"] = held_out_judge(*held, router, bias, gating)(tuned)
    return taken


def _as_list(steps: int | list[int]) -> list[int]:
    return [steps] if isinstance(steps, int) else steps


def _record_steps(fit: dict, steps: int | list[int]) -> None:
    """The audit's step count: the most any group of experts took, and each group's when there are several."""
    steps = _as_list(steps)
    fit["gradient_steps"] = max(steps)
    if len(steps) > 1:
        fit["gradient_steps_per_group"] = steps


def _output_change(router, bias, routing, experts, new_router, new_bias, new_stack):
    """x -> the compressed layer's routed output minus the original's, both on x."""
    return lambda x: (routed_output(x, new_router, new_bias, routing.after, new_stack)
                      - routed_output(x, router, bias, routing.before, experts))


@dataclass(frozen=True)
class _Variant:
    """What is refitted of a candidate: nothing, the down projections, the router rows, or both."""

    down: bool
    router: bool
    ridge: float | None = None  # the down refit's, when not the option's

    @property
    def refits(self) -> bool:
        return self.down or self.router

    @property
    def suffix(self) -> str:
        ridge = f" ridge {self.ridge:g}" if self.ridge is not None else ""
        return (" +router" if self.router else "") + ridge + ("" if self.refits else " (no refit)")

    def fit(self, rows, router, result, kept_bias, stack, shape, options, routing, current=None):
        """(router rows, expert stack) of `result` after this variant's refit on `rows` = (x, target). `current`:
        the candidate's routed output on those rows, when the caller has it."""
        x, target = rows
        new_router = result.router
        if self.router:
            new_router = refit_router(x, router, result, routing.before.router, shape.intermediate, ROUTER_RIDGE)
            current = None  # the routing changed
        if self.down:
            ridge = options.refit_ridge if self.ridge is None else self.ridge
            stack = refit_down(x, target, new_router, kept_bias, routing.after, stack, ridge, current=current)
        return new_router, stack


def _variants(options: RewriteOptions, held_out: bool, merged: bool) -> list[_Variant]:
    """The refit variants each candidate is tried with: the options', both with and without the router
    refit when --refit goes with it (only where something `merged`), and with nothing refitted when the choice
    is made on held-out rows."""
    router = options.refit_router and merged
    variants = [_Variant(options.refit, False)] if options.refit or not router else []
    if router:
        variants.append(_Variant(options.refit, True))
    # Judged on held-out rows, or a router refit alone (its objective is not the output error): nothing refitted
    # competes too.
    if (held_out or not options.refit) and all(v.refits for v in variants):
        variants.append(_Variant(False, False))
    return variants


def _candidates(experts, router, bias, selection, x, groups, options, routing, clock):
    """(label, LayerResult) for every setting the options ask to try, built one at a time."""
    n, kept, scores = router.shape[0], selection.kept, selection.scores
    if options.method == "dern":
        for alpha in options.alpha_candidates or (options.alpha,):
            if experts is None:  # the options showed nothing can move: DERN reduces to pruning, unread
                yield f"dern@{alpha:g}", prune_layer(router, kept, n)
            else:
                yield f"dern@{alpha:g}", dern_layer(experts, router, scores, kept, options.dern_params(alpha),
                                                    clock)
        return
    if options.method == "prune" or x is None:
        yield "prune", prune_layer(router, kept if kept is not None else select_experts(scores, options.experts,
                                                                                        groups), n)
        return
    with clock("fit"):
        stats = expert_stats(x, router, bias, routing.before, experts)
    with clock("cluster"):
        if options.method == "reap":
            result = prune_layer(router, select_experts(stats.reap, options.experts, groups), n)
        elif options.method == "msmoe":
            result = msmoe_layer(experts, router, stats, options.experts, groups)
        else:
            result = hcsmoe_layer(experts, router, stats, options.experts, groups)
    yield options.method, result


def kept_stack(experts: ExpertStack, result: LayerResult) -> ExpertStack:
    """The output layer's K experts as one stack in `experts.dtype` (FP8: bf16): rebuilt weights, or the
    original expert's."""
    names = (*PARTS, "bias", "down_bias") if experts.bias is not None else PARTS
    parts = {p: [] for p in names}
    for expert, rebuilt in zip(result.kept, result.experts, strict=True):
        for p in names:
            mine = getattr(rebuilt, p) if rebuilt is not None else None
            if mine is None:
                mine = experts.weight(p, expert) if p in PARTS else getattr(experts, p)[expert]
            parts[p].append(mine.to(experts.dtype))
    return ExpertStack(*(torch.stack(parts[p]) for p in names))


def output_bias(family: Family, bias: torch.Tensor, result: LayerResult, intermediate: int) -> torch.Tensor:
    """The router bias rows of the output: the kept experts' values, for a score-correction bias (a
    load-balancing term, docs/method.md, Stage 2); a bias inside the router's logits (gpt-oss) follows Eq. 8 as the
    router's rows do."""
    if family.bias_in_logits and result.router_transferred and result.dropped:
        flat = bias.reshape(-1, 1)
        return transfer_router(flat, result.kept, result.dropped, result.counts.to(flat.device),
                               intermediate).reshape(*bias.shape[:-1], -1)
    return bias[..., result.kept]


class RequantizationError:
    """||dequant(quant(W)) - W|| / ||W|| over a layer's rebuilt weights, summed tensor by tensor (float64)."""

    def __init__(self) -> None:
        self.diff = self.norm = 0.0

    def add(self, weight: torch.Tensor, back: torch.Tensor) -> None:
        self.diff += float((back.float() - weight.float()).double().square().sum())
        self.norm += float(weight.double().square().sum())

    def value(self) -> float | None:
        return (self.diff / self.norm) ** 0.5 if self.norm > 0 else None


def _take_refit(result: LayerResult, before: ExpertStack, after: ExpertStack) -> None:
    """Store refitted projections (in the experts' dtype); an expert the refits did not touch (no tokens)
    stays as it was, a raw copy if it was one."""
    for pos, rebuilt in enumerate(result.experts):
        changed = [p for p in PARTS if not torch.equal(getattr(before, p)[pos].float(), getattr(after, p)[pos].float())]
        if not changed:
            continue
        if rebuilt is None:
            rebuilt = result.experts[pos] = RebuiltExpert(before.gate[pos], before.up[pos], before.down[pos])
        for p in changed:
            setattr(rebuilt, p, getattr(after, p)[pos].to(before.dtype))


def expert_tensor_names(family: Family, layer: MoELayer, experts: int) -> list[str]:
    """Every stored tensor of experts 0..experts-1 of `layer`: weights, and their scales when FP8 (a
    fused layout: its two tensors, whatever `experts` is)."""
    if family.fused is not None:
        return [t.name for t in fused_tensors(family, layer.index, 0, 0, layer.storage)]
    return [t for name in family.expert_names(layer.index, experts) for t in layer.storage.tensor_names(name)]


def layer_output_names(family: Family, layer: MoELayer, experts: int) -> list[str]:
    """The output tensors write_layer writes for `layer`."""
    names = [family.router_name(layer.index)] + ([family.bias_name(layer.index)] if layer.bias is not None else [])
    return names + expert_tensor_names(family, layer, experts)


def copy_tensor(writer: ShardedWriter, ckpt: Checkpoint, name: str) -> None:
    """An input tensor into the output unchanged (raw bytes), or dequantized where the plan says bf16."""
    if writer.specs[name].dtype == ckpt.entries[name].dtype:
        writer.copy_raw(name, ckpt.entries[name])
    else:
        writer.write(name, load_weight(ckpt, name).to(DTYPES[writer.specs[name].dtype]))


def write_layer(
    writer: ShardedWriter, ckpt: Checkpoint, family: Family, layer: MoELayer, report: LayerReport,
    dequantized: bool = False,
) -> None:
    """Router rows, score-correction bias and experts renumbered 0..K-1 in kept order.

    Experts that DERN left unchanged are copied as raw bytes (with their FP8 scales), so they are
    bit-identical to the input. Rebuilt FP8 experts are quantized again with the input's block scheme, one
    tensor at a time on the device that built them (one tensor's bytes cross to the host); the relative
    error that adds is recorded (`requantization_error`). `dequantized`: every expert is written in bf16
    instead, without scales.
    """
    result, i, storage = report.result, layer.index, layer.storage
    error = RequantizationError()
    try:
        writer.write(family.router_name(i), result.router.cpu())
        if layer.bias is not None:
            # A load-balancing term, not a routing weight: the kept experts keep their values (docs/method.md, Stage 2).
            writer.write(family.bias_name(i), output_bias(family, ckpt.load(family.bias_name(i)), result,
                                                          family.intermediate_size(ckpt.config)))
        dtype = torch.bfloat16 if dequantized else DTYPES[layer.dtype]
        if family.fused is not None:
            report.requantization_error = _write_fused(writer, ckpt, family, layer, result, dequantized)
            return
        for pos, (expert, rebuilt) in enumerate(zip(result.kept, result.experts, strict=True)):
            for part in PARTS:
                name = family.expert_name(i, pos, part)
                if rebuilt is None and dequantized:
                    writer.write(name, load_weight(ckpt, family.expert_name(i, expert, part)).to(dtype))
                elif rebuilt is None:
                    for out, src in zip(storage.tensor_names(name),
                                        storage.tensor_names(family.expert_name(i, expert, part)), strict=True):
                        writer.copy_raw(out, ckpt.entries[src])
                elif storage.fp8 and not dequantized:
                    weight = getattr(rebuilt, part).float()
                    q, scale = quantize(weight, storage.block, DTYPES[layer.scale_dtype], storage.pow2_scales)
                    error.add(weight, dequantize(q, scale, storage.block))
                    writer.write(name, q.cpu())
                    writer.write(name + SCALE_SUFFIX, scale.cpu())
                else:
                    writer.write(name, getattr(rebuilt, part).to(dtype).cpu())  # the only device-to-host copy
    except NonFiniteTensor as e:
        if e.copied:
            raise
        raise NonFiniteTensor(f"{e}: {_non_finite_cause(ckpt, family, layer)}", copied=False) from None
    if error.value() is not None:
        report.requantization_error = error.value()


def _write_fused(writer: ShardedWriter, ckpt: Checkpoint, family: Family, layer: MoELayer, result: LayerResult,
                 dequantized: bool) -> float | None:
    """The K experts in the input's fused layout: a kept expert nothing changed is its input slice's bytes,
    read straight into place; a rebuilt one is laid out again (gate/up order and interleaving kept, MXFP4
    quantized again). `dequantized`: every expert in bf16, in the family's float layout. Returns the
    MXFP4 requantization error of the rebuilt experts' weights (relative, as for FP8), else None."""
    error = RequantizationError()
    hidden = int(ckpt.config["hidden_size"])
    out_storage = ExpertStorage() if dequantized else layer.storage
    names = [t.name for t in fused_tensors(family, layer.index, hidden, 0, out_storage)]
    outputs = [torch.empty(writer.specs[n].shape, dtype=DTYPES[writer.specs[n].dtype]) for n in names]
    float_dtype = torch.bfloat16 if dequantized else DTYPES[layer.dtype]
    h_in = family.intermediate_size(ckpt.config)
    for pos, (expert, rebuilt) in enumerate(zip(result.kept, result.experts, strict=True)):
        if rebuilt is None and not dequantized:
            for name, out in zip(names, outputs, strict=True):
                ckpt.read_rows_into(name, expert, out[pos:pos + 1])
            continue
        if rebuilt is None:
            floats = to_float(_read_slices(ckpt, family, layer, hidden, h_in, expert), layer.storage)
        else:
            down_bias = rebuilt.down_bias
            if family.fused.biased and down_bias is None:  # DERN keeps the kept expert's own (one per expert)
                down_bias = _row(ckpt, family.fused_names(layer.index)[-1], expert, DTYPES[layer.dtype])
            floats = family.fused.join(*(t.float().cpu() if t is not None else None for t in (
                rebuilt.gate, rebuilt.up, rebuilt.down, rebuilt.bias, down_bias)))
        parts = from_float([t.to(float_dtype) for t in floats], out_storage)
        if rebuilt is not None and out_storage.mxfp4:
            for weight, back in zip(floats[:2], to_float(parts, out_storage)[:2], strict=True):
                error.add(weight, back)
        for out, part in zip(outputs, parts, strict=True):
            out[pos].copy_(part)
    for name, out in zip(names, outputs, strict=True):
        writer.write(name, out)
    return error.value()


def _read_slices(ckpt: Checkpoint, family: Family, layer: MoELayer, hidden: int, intermediate: int,
                 expert: int) -> list[torch.Tensor]:
    """One expert's slice of each stored tensor of a fused layer, each read with one pread."""
    out = []
    for t in fused_tensors(family, layer.index, hidden, intermediate, layer.storage):
        buffer = torch.empty(1, *t.slice_shape, dtype=DTYPES[t.dtype or layer.dtype])
        ckpt.read_rows_into(t.name, expert, buffer)
        out.append(buffer[0])
    return out


def _row(ckpt: Checkpoint, name: str, index: int, dtype: torch.dtype) -> torch.Tensor:
    """Entry `index` of a tensor's leading dimension, read alone."""
    out = torch.empty(1, *ckpt.entries[name].shape[1:], dtype=dtype)
    ckpt.read_rows_into(name, index, out)
    return out[0]


def _non_finite_cause(ckpt: Checkpoint, family: Family, layer: MoELayer) -> str:
    """Why a rebuilt tensor of `layer` is not finite: the first input tensor of the layer that is not,
    or else overflow of the stored dtype. Read only on this failure path."""
    i = layer.index
    names = [family.router_name(i), *([family.bias_name(i)] if layer.bias is not None else []),
             *expert_tensor_names(family, layer, family.num_experts(ckpt.config))]
    for name in names:
        if not all_finite(ckpt.load(name)):
            return f"the input's {name} holds NaN or Inf (the input weights are not finite)"
    return f"the input weights of layer {i} are finite, so the rebuilt values overflow {layer.dtype}"
