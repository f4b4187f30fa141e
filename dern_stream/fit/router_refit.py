"""Least-squares refit of the kept experts' router rows (docs/method.md, "Beyond the paper").

After a merge, kept expert k stands for itself and for the share of each dropped expert's segments it
took in (`LayerResult.counts`): a_ek = 1 for k itself, counts[e, k] / h for a dropped e. Its target
routing mass on input x is that of its members in the original layer:
- softmax routers: p'_k = sum_e a_ek p_e(x), so its target logit is t_k = logsumexp_e(z_e + log a_ek),
  up to a per-token constant (a softmax ignores one), so rows are fitted to the centred targets;
- sigmoid routers: each gate is a probability of its own, so the members' mass is the chance that any of them
  fires, s'_k = 1 - prod_e (1 - s_e)^a_ek (their sum while the scores are small, never above 1), and
  t_k = logit(s'_k).
The rows R [K, d] minimise sum_x ||R x - t(x)||^2 + lambda ||R - R_0||^2 on the cached inputs (R_0: the
rows the method gave), with lambda relative to the Gram matrix's mean diagonal. Where the softmax also scores experts
the rewrite keeps as they are (LongCat-Flash's zero experts), the per-token constant is theirs to fix: the targets
are then fitted as they are, uncentred. A kept expert that took
nothing in keeps its own logit as target, so pure pruning leaves the router as it was.
"""

from __future__ import annotations

import torch

from ..experts.result import LayerResult
from ..families.routing import SigmoidGroupLimited, SigmoidTopK

_SIGMOID_ROUTERS = (SigmoidGroupLimited, SigmoidTopK)
_CLIP = 1e-6  # sigmoid targets stay in [_CLIP, 1 - _CLIP], where logit() is finite


def membership(result: LayerResult, num_experts: int, intermediate: int, device: torch.device) -> torch.Tensor:
    """a [N, K]: the share of original expert e that kept expert k stands for (float64)."""
    a = torch.zeros(num_experts, len(result.kept), dtype=torch.float64, device=device)
    a[result.kept, torch.arange(len(result.kept), device=device)] = 1.0
    if result.dropped:
        a[result.dropped] = result.counts.to(device=device, dtype=torch.float64) / intermediate
    return a


def target_logits(logits: torch.Tensor, a: torch.Tensor, sigmoid: bool, centred: bool = True) -> torch.Tensor:
    """t [T, K] from the original logits z [T, N] and the membership a [N, K] (see the module doc)."""
    z = logits.double()
    if sigmoid:
        # log(1 - s'_k) = sum_e a_ek log(1 - s_e), and log(1 - sigmoid(z)) = -softplus(z)
        miss = -torch.nn.functional.softplus(z) @ a
        return torch.logit((-torch.expm1(miss)).clamp(_CLIP, 1 - _CLIP))
    # log sum_e a_ek exp(z_e), shifted by each token's largest logit: [T, K] products only (never [T, N, K]).
    top = z.amax(dim=1, keepdim=True)
    t = top + ((z - top).exp() @ a).clamp_min(1e-300).log()
    return t - t.mean(dim=1, keepdim=True) if centred else t


def refit_router(x: torch.Tensor, router: torch.Tensor, result: LayerResult, router_kind, intermediate: int,
                 ridge: float, anchored: bool = False) -> torch.Tensor:
    """New router rows [K, d] in `result.router`'s dtype, fitted on the cached inputs x [T, d] of the layer
    whose original router is `router` [N, d]. `router_kind`: the family's Router (its class says whether
    scores are a softmax or sigmoids). `anchored`: the softmax also scores rows kept as they are (zero experts)."""
    sigmoid = isinstance(router_kind, _SIGMOID_ROUTERS)
    xd = x.double()
    a = membership(result, router.shape[0], intermediate, x.device)
    t = target_logits(xd @ router.to(x.device).double().T, a, sigmoid, centred=not anchored)  # [T, K]
    start = result.router.to(x.device).double()
    gram = xd.T @ xd
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    gram.diagonal().add_(lam)
    if sigmoid or anchored:
        rows = torch.linalg.solve(gram, xd.T @ t + lam * start.T).T
    else:
        # Logits matter up to a per-token constant: fit the centred rows, keep R_0's common part.
        mean = start.mean(dim=0, keepdim=True)
        rows = torch.linalg.solve(gram, xd.T @ t + lam * (start - mean).T).T
        rows = rows - rows.mean(dim=0, keepdim=True) + mean
    return rows.to(result.router.dtype)
