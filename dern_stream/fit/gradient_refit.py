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

Adam holds about 22 bytes per weight it moves (docs/performance.md, "The fit on large layers"): 124 GB for half
of DeepSeek-V3's experts in one layer. With `group`, the experts move a group at a time, each against what the
others leave of the target, on the rows routed to it; the step count is then chosen per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import DernError, arg
from ..experts.forward import Gating, relative_error, routed_output
from ..experts.segments import ExpertStack
from ..families import PARTS

LEARNING_RATE = 0.03  # per step, relative to each tensor's RMS (docs/quality.md, "The gradient steps and the groups")
BATCH_ROWS = 4096
CHECK_EVERY = 25  # steps between two looks at the held-out error


def refit_gradient(x: torch.Tensor, target: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None,
                   gating: Gating, experts: ExpertStack, steps: int | Sequence[int],
                   held: tuple[torch.Tensor, torch.Tensor] | None = None,
                   group: int | None = None) -> tuple[ExpertStack, list[int]]:
    """(new float32 stack, steps taken by each group of experts). The kept experts move `group` at a time (all
    together by default); each group in turn against the others' output as it stands (block Gauss-Seidel, as the
    down refit), so only one group's gradients and Adam moments exist at once. `steps`: a count for every group, or
    one per group. Without `held`, exactly that many steps; with held-out rows `held` = (x, target), each group's
    weights after the best of 0, CHECK_EVERY, 2*CHECK_EVERY, ... steps by the layer's error on those rows."""
    if experts.down_bias is not None:
        raise DernError(f"{arg('refit_steps')} does not model experts with biases (gpt-oss) yet")
    k = experts.gate.shape[0]
    size = min(group or k, k)
    members = [range(s, min(s + size, k)) for s in range(0, k, size)]
    counts = [steps] * len(members) if isinstance(steps, int) else list(steps)
    try:
        if len(members) == 1:
            judge = held_out_judge(*held, router_weight, bias, gating) if held is not None else None
            stack, taken = _adam(x, target, router_weight, bias, gating, experts, counts[0], judge)
            return stack, [taken]
        return _by_groups(x, target, router_weight, bias, gating, experts, counts, held, members)
    except torch.OutOfMemoryError:
        raise DernError(f"{arg('refit_steps')}: the float32 weights, gradients and Adam moments of "
                        f"{size} experts do not fit in {x.device} memory; give a smaller {arg('refit_group')}, "
                        f"{arg('refit_steps', 0)} or {arg('device', 'cpu')}") from None


def _by_groups(x, target, router_weight, bias, gating, experts, counts, held, members):
    """Each group of experts fitted in turn on the rows routed to it, to what the layer's output still lacks
    with the other experts as they stand (their output kept up to date as each group moves)."""
    every = slice(None)
    result = [experts.weight(p, every).to(torch.float32, copy=True) for p in PARTS]
    sets = [(x, target)] + ([held] if held is not None else [])
    # Per set of rows: the layer's output now, and each row's experts.
    current = [routed_output(r, router_weight, bias, gating, ExpertStack(*result)) for r, _ in sets]
    chosen = [gating.weights(r, router_weight, bias)[0] for r, _ in sets]
    taken = []
    for g, count in zip(members, counts, strict=True):
        part = ExpertStack(*(t[g.start:g.stop] for t in result))
        rows = [((i >= g.start) & (i < g.stop)).any(dim=1).nonzero().squeeze(1) for i in chosen]
        # Not moved: no steps asked, no fitting row reaches the group, or no held-out row could judge the steps.
        if not count or any(n.numel() == 0 for n in rows):
            taken.append(0)
            continue
        own = [routed_output(r[n], router_weight, bias, gating, part, g) for (r, _), n in zip(sets, rows, strict=True)]
        # What the group should produce on its rows: the target less the other experts' output.
        goals = [(y[n] - c[n] + o) for (_, y), c, n, o in zip(sets, current, rows, own, strict=True)]
        judge = None
        if held is not None:  # the group's error on the held-out rows it reaches (the layer's, up to a factor)
            judge = held_out_judge(held[0][rows[1]], goals[1], router_weight, bias, gating, g)
        fitted, steps = _adam(x[rows[0]], goals[0], router_weight, bias, gating, part, count, judge, g)
        taken.append(steps)
        del goals, judge
        for (r, _), c, n, o in zip(sets, current, rows, own, strict=True):
            change = routed_output(r[n], router_weight, bias, gating, fitted, g)
            change -= o
            c.index_add_(0, n, change)
            del change
        for t, new in zip(result, (fitted.gate, fitted.up, fitted.down), strict=True):
            t[g.start:g.stop] = new
        del own, fitted
    return ExpertStack(*result), taken


def _adam(x, target, router_weight, bias, gating, experts, steps, judge, members=None):
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
            out = routed_output(x[pick], router_weight, bias, gating, _PerExpert(params), members)
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
                   gating: Gating, members: range | None = None) -> Callable[[ExpertStack], float]:
    """stack -> its routed output's relative error on (x, target); with `members`, the output of those experts
    only, which the stack then holds (moe_forward.routed_output)."""
    return lambda stack: relative_error(routed_output(x, router_weight, bias, gating, stack, members), target)
