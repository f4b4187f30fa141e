"""Gradient refit of the kept experts' gate, up and down projections (docs/method.md, "Beyond the paper").

The least-squares refit (refit.py) has a closed form only for the down projections: the output is linear in
them. Gate and up sit inside the activation, and their normal equations would be (h*d)^2 per expert. Here all
three are moved together by Adam on the same objective, the layer's routed output against the original's,
on the cached inputs, routing fixed by the router as given:
    min over W_g, W_u, W_d of  sum_x || sum_{e in A'(x)} w_e(x) W_d,e a_e(x) - y(x) ||^2
Adam's step is per element and scale-free, so each tensor's learning rate is a fraction of its own RMS. The
number of steps is the regulariser: chosen on held-out rows when the caller has them (an early stop), and
the caller then runs that many steps on all rows. Minibatches are drawn by a seeded generator, so a rerun
(a resume) gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import DernError, arg
from ..families import PARTS
from .moe_forward import Gating, relative_error, routed_output
from .segments import ExpertStack

LEARNING_RATE = 0.03  # per step, relative to each tensor's RMS (README, "Quality")
BATCH_ROWS = 4096
CHECK_EVERY = 25  # steps between two looks at the held-out error


def refit_gradient(x: torch.Tensor, target: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None,
                   gating: Gating, experts: ExpertStack, steps: int,
                   judge: Callable[[ExpertStack], float] | None = None) -> tuple[ExpertStack, int]:
    """(new float32 stack, steps taken). Without `judge`, exactly `steps` steps. With `judge(stack)` (the
    held-out error), the stack after the best of 0, CHECK_EVERY, 2*CHECK_EVERY, ... `steps` steps by it."""
    if experts.down_bias is not None:
        raise DernError(f"{arg('refit_steps')} does not model experts with biases (gpt-oss) yet")
    try:
        return _adam(x, target, router_weight, bias, gating, experts, steps, judge)
    except torch.OutOfMemoryError:
        raise DernError(f"{arg('refit_steps')}: the kept experts' float32 weights, gradients and Adam moments "
                        f"(four copies) do not fit in {x.device} memory; give {arg('refit_steps', 0)} or "
                        f"{arg('device', 'cpu')}") from None


def _adam(x, target, router_weight, bias, gating, experts, steps, judge):
    every = slice(None)
    params = [experts.weight(p, every).to(torch.float32, copy=True).requires_grad_(True) for p in PARTS]
    groups = [{"params": [p], "lr": LEARNING_RATE * float(p.detach().square().mean().sqrt()) + 1e-12}
              for p in params]
    optimizer = torch.optim.Adam(groups, foreach=False)  # one tensor's temporaries at a time: less memory
    generator = torch.Generator(device=x.device).manual_seed(0)
    scale = float(target.square().sum(dim=-1).mean()) + 1e-30
    rows = x.shape[0]
    with torch.no_grad():
        best_error = judge(ExpertStack(*params)) if judge is not None else None
    best = ([p.detach().clone() for p in params], 0)
    for step in range(1, steps + 1):
        pick = torch.randint(rows, (min(BATCH_ROWS, rows),), generator=generator, device=x.device)
        with torch.enable_grad():
            out = routed_output(x[pick], router_weight, bias, gating, _PerExpert(params))
            loss = (out - target[pick]).square().sum(dim=-1).mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if judge is not None and (step % CHECK_EVERY == 0 or step == steps):
            with torch.no_grad():
                error = judge(ExpertStack(*params))
            if error < best_error:
                best_error, best = error, ([p.detach().clone() for p in params], step)
    if judge is None:
        best = ([p.detach() for p in params], steps)
    return ExpertStack(*best[0]), best[1]


class _PerExpert(ExpertStack):
    """The stacked leaves read one expert at a time through `unbind` views, whose backward gathers every
    expert's gradient in one allocation; indexing the stacked leaf instead allocates a whole-stack gradient per
    expert (K times the memory traffic)."""

    def __init__(self, leaves: list[torch.Tensor]):
        super().__init__(*leaves)
        self._experts = [t.unbind(0) for t in leaves]

    def weight(self, part: str, experts: int | torch.Tensor) -> torch.Tensor:
        if isinstance(experts, int):
            return self._experts[PARTS.index(part)][experts]
        return super().weight(part, experts)


def held_out_judge(x: torch.Tensor, target: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None,
                   gating: Gating) -> Callable[[ExpertStack], float]:
    """stack -> its routed output's relative error on (x, target)."""
    return lambda stack: relative_error(routed_output(x, router_weight, bias, gating, stack), target)
