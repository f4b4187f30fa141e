"""One MoE layer in three steps, run on three threads by pipeline.py: read its tensors, compress, write."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..experts.forward import Gating, LayerRouting, expert_stats, relative_error, routed_output
from ..experts.importance import select_experts
from ..experts.merging import hcsmoe_layer, msmoe_layer
from ..experts.recombine import dern_layer
from ..experts.result import kept_stack, output_bias, prune_layer, take_refit
from ..experts.segments import ExpertStack
from ..families import PARTS, Family, GroupPlan
from ..fit.gradient_refit import held_out_judge, refit_gradient
from ..fit.rows import FitRows
from ..fit.variants import RIDGE_FACTORS, refit_variants
from ..layout.moe_layers import ModelShape
from ..options import RewriteOptions
from ..runtime.stage_clock import NO_CLOCK, StageClock
from .layer_io import LayerInputs
from .layer_report import LayerReport, LayerSelection

# Fits the layer's options on `FitRows` (the caller's: from the dump, or the sequential forward) when given.
FitSource = Callable[[torch.Tensor, "torch.Tensor | None", "ExpertStack"], FitRows]


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
            variants = refit_variants(options, bool(data.held), merged=bool(result.segments_reassigned))
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
            take_refit(best, stack, new_stack)
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


