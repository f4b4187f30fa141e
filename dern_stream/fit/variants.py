"""The refit variants a candidate is tried with (nothing, the down projections, the router rows, both; the
ridge), and what each refits (docs/method.md, "Beyond the paper")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .down_refit import refit_down
from .router_refit import refit_router

if TYPE_CHECKING:
    from ..options import RewriteOptions

ROUTER_RIDGE = 0.01  # --refit-router's ridge, relative to the mean Gram diagonal (docs/method.md, "Beyond the paper")
RIDGE_FACTORS = (0.1, 0.3, 3.0)  # with --holdout, the down refit's ridge is also tried at these times --refit-ridge


@dataclass(frozen=True)
class Variant:
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
        """(router rows, expert stack, residual) of `result` after this variant's refit on `rows` = (x, target);
        the residual, target - output on those rows, where the down refit ran (else None). `current`: the
        candidate's routed output on those rows, when the caller has it."""
        x, target = rows
        new_router, residual = result.router, None
        if self.router:
            # (the rows are fitted on what they multiply: x as the router reads it, Gemma 4's scaled)
            anchored = routing.before.passive_rows is not None
            new_router = refit_router(routing.before.router_input(x), router, result, routing.before.router,
                                      shape.intermediate, ROUTER_RIDGE, anchored=anchored)
            current = None  # the routing changed
        if self.down:
            ridge = options.refit_ridge if self.ridge is None else self.ridge
            stack, residual = refit_down(x, target, new_router, kept_bias, routing.after, stack, ridge,
                                         current=current)
        return new_router, stack, residual


def refit_variants(options: RewriteOptions, held_out: bool, merged: bool) -> list[Variant]:
    """The refit variants each candidate is tried with: the options', both with and without the router
    refit when --refit goes with it (only where something `merged`), and with nothing refitted when the choice
    is made on held-out rows."""
    router = options.refit_router and merged
    variants = [Variant(options.refit, False)] if options.refit or not router else []
    if router:
        variants.append(Variant(options.refit, True))
    # Judged on held-out rows, or a router refit alone (its objective is not the output error): nothing refitted
    # competes too.
    if (held_out or not options.refit) and all(v.refits for v in variants):
        variants.append(Variant(False, False))
    return variants
