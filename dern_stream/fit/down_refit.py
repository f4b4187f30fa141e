"""Least-squares refit of the kept experts' down projections (docs/method.md, "Beyond the paper").

The compressed layer's routed output is fitted to the original layer's on the cached inputs:
    min over W_d,e of  sum_x || sum_{e in A'(x)} w_e(x) W_d,e a_e(x) - y(x) ||^2 + lambda_e ||W_d,e - W_d,e^0||^2
with the compressed routing A', w fixed and a_e(x) = act(W_g,e x) * (W_u,e x) (Llama-4, whose weights scale
the input: a_e(w_e x) in place of w_e a_e(x)). The problem is
joint over experts (a token's output sums several); it is solved by block Gauss-Seidel, one expert
at a time against the current residual, so only one expert's h x h Gram matrix exists at once.
The ridge pulls towards the current weights, scaled by the Gram matrix's mean diagonal, so an
expert that few tokens reach barely moves. It must be strong: the layers are fitted on the original
model's inputs, not on the compressed model's, and a weak ridge overfits them (docs/quality.md, "The
least-squares refit").
"""

from __future__ import annotations

import torch

from ..errors import DernError, arg
from ..experts.forward import Gating, routed_features, routed_output, routed_rows, row_block
from ..experts.segments import ExpertStack


def refit_down(x: torch.Tensor, target: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None,
               gating: Gating, experts: ExpertStack, ridge: float, sweeps: int = 2,
               current: torch.Tensor | None = None) -> tuple[ExpertStack, torch.Tensor]:
    """New stack with refitted down projections (gate and up are shared with `experts`), and the residual
    target - output of the refitted layer on `x`. `current` is the layer's routed output before the refit, when the
    caller has it already."""
    if experts.down_bias is not None:
        raise DernError(f"{arg('refit')} does not model experts with biases (gpt-oss) yet")
    idx, w = gating.weights(x, router_weight, bias)
    act = gating.activation()
    down = experts.weight("down", slice(None)).to(torch.float32, copy=True)
    if current is None:
        current = routed_output(x, router_weight, bias, gating, experts)
    residual = target - current
    del current
    block = row_block(experts.intermediate, x.shape[1])
    for _ in range(sweeps):
        for e in range(down.shape[0]):
            blocks = list(routed_rows(idx, e, block))
            if not blocks:
                continue
            # The normal equations of what this expert should produce with the others fixed: its features F and
            # goal F D^T + r give F^T F and F^T r + (F^T F) D^T, summed over its rows a block at a time (the goal
            # itself, rows x d, is never formed); one block's features are kept for the update.
            gram = rhs = None
            for tok, slot in blocks:
                feats = None  # one block's features alive at a time
                feats = routed_features(x[tok], w[tok, slot], experts, e, gating, act)
                if gram is None:
                    gram, rhs = (feats.T @ feats).double(), (feats.T @ residual[tok]).double()
                else:  # in place: a second h x h double matrix would cost 1.6 GB on Mixtral-8x7B
                    gram.add_(feats.T @ feats)
                    rhs.add_(feats.T @ residual[tok])
            old = down[e].T.double()
            rhs.addmm_(gram, old)
            lam = ridge * float(gram.diagonal().mean()) + 1e-12
            rhs.add_(old, alpha=lam)
            gram.diagonal().add_(lam)
            # Symmetric positive definite (a Gram matrix plus the ridge): Cholesky, half the work of LU.
            new = torch.cholesky_solve(rhs, torch.linalg.cholesky(gram)).T.to(down.dtype)  # [d, h]
            del gram, rhs, old
            change = (new - down[e]).T  # the residual loses what the expert's output gained
            # The last block first, its features still at hand; then the others, computed again. (The blocks'
            # rows are disjoint: each token routes to an expert once.)
            residual[blocks[-1][0]] -= feats @ change
            for tok, slot in blocks[:-1]:
                feats = None
                feats = routed_features(x[tok], w[tok, slot], experts, e, gating, act)
                residual[tok] -= feats @ change
            down[e] = new
    every = slice(None)
    return ExpertStack(experts.weight("gate", every), experts.weight("up", every), down), residual
