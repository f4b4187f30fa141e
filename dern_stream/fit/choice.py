"""The per-layer choice on the cached inputs: every candidate a method builds, with every refit variant the options
ask for, judged by how close its output is to the original layer's (on held-out rows with `--holdout`); then the
chosen one fitted on all the rows and moved by the gradient steps (docs/method.md, "Beyond the paper").
What was tried and what it scored goes into the layer's audit record."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..experts.forward import LayerRouting, relative_error, routed_output
from ..experts.result import LayerResult, kept_stack, output_bias, take_refit
from ..experts.segments import ExpertStack
from ..families import PARTS, Family
from ..runtime.stage_clock import StageClock
from .gradient_refit import held_out_judge, refit_gradient
from .rows import FitRows
from .variants import RIDGE_FACTORS, Variant, refit_variants

if TYPE_CHECKING:
    from ..layout.moe_layers import ModelShape
    from ..options import RewriteOptions


@dataclass
class Chosen:
    """The best setting so far: a candidate, its refit variant, and its tensors before and after the refit."""

    result: LayerResult
    variant: Variant
    bias: torch.Tensor | None  # the kept experts' router bias rows
    stack: ExpertStack | None  # the kept experts as built
    router: torch.Tensor | None  # their router rows after the variant's refit
    refitted: ExpertStack | None  # the kept experts after it

    def take(self) -> tuple:
        """(bias, stack, router, refitted), handed over: the tensors are then held by the caller alone."""
        out = (self.bias, self.stack, self.router, self.refitted)
        self.stack = self.router = self.refitted = None
        return out


@dataclass
class LayerFit:
    """One layer's fit on its cached rows, against the original layer (its router, bias and experts on the compute
    device); `record` collects what the audit shows of it."""

    data: FitRows
    router: torch.Tensor
    bias: torch.Tensor | None
    experts: ExpertStack | None
    family: Family
    shape: ModelShape
    options: RewriteOptions
    routing: LayerRouting
    clock: StageClock
    record: dict

    def choose(self, candidates: Iterable[tuple[str, LayerResult]]) -> Chosen:
        """The best of `candidates` and their refit variants."""
        best, pruned_seen = None, False
        for label, result in candidates:
            pruned = not result.segments_reassigned and all(e is None for e in result.experts)
            if pruned and pruned_seen:
                continue  # plain pruning again (an alpha that moved nothing): the same layer as before
            pruned_seen |= pruned
            with self.clock("fit"):
                best = self._try(label, result, best)
        return best

    def _try(self, label: str, result: LayerResult, best: Chosen | None) -> Chosen | None:
        """`result` with each of its refit variants (and, with a held-out share, the down refit's ridge at a few
        more values when it wins): the new best if one of them beats `best`, else `best`."""
        options, data = self.options, self.data
        kept_bias = output_bias(self.family, self.bias, result, self.shape.intermediate) if self.bias is not None \
            else None
        stack = kept_stack(self.experts, result)
        x, y = data.judging()
        output = routed_output(x, result.router, kept_bias, self.routing.after, stack)
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
            new_router, new_stack, residual = variant.fit(data.fitting(), self.router, result, kept_bias, stack,
                                                          self.shape, options, self.routing, current)
            judged = error
            if variant.refits:
                judged = entry["error_after_refit"] = _error_after(residual, data, x, y, new_router, kept_bias,
                                                                   self.routing, new_stack)
            del residual
            self.record.setdefault("candidates", []).append(entry)
            if best is None or judged < self.record["error"]:
                self.record["error"], self.record["chosen"] = judged, entry["candidate"]
                best = Chosen(result, variant, kept_bias, stack, new_router, new_stack)
            del new_stack
            if not variants and data.held and best.variant.down and best.result is result and not ridges_tried:
                # The ridge too is chosen on the held-out rows, for the best setting found so far.
                variants, ridges_tried = [replace(best.variant, ridge=options.refit_ridge * f)
                                          for f in RIDGE_FACTORS], True
        return best

    def finish(self, chosen: Chosen, then: Callable | None = None) -> LayerResult:
        """The chosen setting as written: refitted on all the rows when it was chosen on held-out ones, then moved
        by the gradient steps (as many as the held-out rows favour). `then(replace)`: called with the layer's output
        change (x -> new routed output - original) while the experts are still on the device (sequential.py)."""
        data, options = self.data, self.options
        with self.clock("fit"):
            kept_bias, stack, new_router, new_stack = chosen.take()
            steps = options.refit_steps
            if data.held and steps:
                steps = self._held_out_steps(steps, new_router, kept_bias, new_stack)
            if data.held:  # chosen on the held-out rows: the chosen variant is fitted again on all of them
                self.record["error_on"] = "held-out rows"
                new_router, new_stack, _ = chosen.variant.fit((data.x, data.target), self.router, chosen.result,
                                                              kept_bias, stack, self.shape, options, self.routing)
            if any(_as_list(steps)):
                new_stack = self._gradient_steps(steps, new_router, kept_bias, new_stack)
            best = chosen.result
            best.router = new_router
            take_refit(best, stack, new_stack)
            if then is not None:  # the layer as written: refitted projections in the experts' dtype
                written = ExpertStack(*(getattr(new_stack, p).to(stack.dtype) for p in PARTS))
                then(_output_change(self.router, self.bias, self.routing, self.experts, best.router, kept_bias,
                                    written))
        return best

    def _held_out_steps(self, steps: int, router, bias, stack: ExpertStack) -> list[int]:
        """The number of gradient steps (at most `steps`) of each group of experts (one group without
        --refit-group) after which the chosen setting, fitted on the fitting rows, is best on the held-out rows."""
        gating, held = self.routing.after, self.data.judging()
        tuned, taken = refit_gradient(*self.data.fitting(), router, bias, gating, stack, steps, held,
                                      self.options.refit_group)
        _record_steps(self.record, taken)
        if any(taken):
            self.record["error"] = self.record["error_after_gradient"] = held_out_judge(*held, router, bias,
                                                                                       gating)(tuned)
        return taken

    def _gradient_steps(self, steps: int | list[int], router, bias, stack: ExpertStack) -> ExpertStack:
        """`stack` moved by `steps` gradient steps on all the rows. Without a held-out share they are judged on the
        rows they were fitted on, as the other refits are, and kept only if they lower the error there."""
        data, gating = self.data, self.routing.after
        tuned, _ = refit_gradient(data.x, data.target, router, bias, gating, stack, steps,
                                  group=self.options.refit_group)
        if data.held:
            return tuned
        error = relative_error(routed_output(data.x, router, bias, gating, tuned), data.target)
        lowered = error < self.record["error"]  # (minibatch steps may not lower the error on all the rows)
        self.record["error_after_gradient"] = error
        _record_steps(self.record, steps if lowered else 0)
        if not lowered:
            return stack
        self.record["error"] = error
        return tuned


def _error_after(residual: torch.Tensor | None, data: FitRows, x, y, router, bias, routing: LayerRouting,
                 stack: ExpertStack) -> float:
    """The refitted layer's relative error on the judging rows: from the down refit's residual where it was fitted
    on those same rows (no forward pass), else by running the layer on them."""
    if residual is not None and not data.held:
        reference = float(torch.linalg.vector_norm(y.double()))
        diff = float(torch.linalg.vector_norm(residual.double()))
        return diff / reference if reference > 0 else diff
    return relative_error(routed_output(x, router, bias, routing.after, stack), y)


def _as_list(steps: int | list[int]) -> list[int]:
    return [steps] if isinstance(steps, int) else steps


def _record_steps(record: dict, steps: int | list[int]) -> None:
    """The audit's step count: the most any group of experts took, and each group's when there are several."""
    steps = _as_list(steps)
    record["gradient_steps"] = max(steps)
    if len(steps) > 1:
        record["gradient_steps_per_group"] = steps


def _output_change(router, bias, routing: LayerRouting, experts, new_router, new_bias, new_stack):
    """x -> the compressed layer's routed output minus the original's, both on x."""
    return lambda x: (routed_output(x, new_router, new_bias, routing.after, new_stack)
                      - routed_output(x, router, bias, routing.before, experts))
