"""Log-likelihoods of token continuations, computed with the streamed forward: every request goes through
decoder layer L before layer L+1 is read, so each layer is read once for all requests.

The input of a request is lm-eval's (its HFLM, docs/evaluation.md): context and continuation joined,
left-truncated to `max_length + 1` tokens, without the last token. Batches are right-padded without an
attention mask, as HFLM does: under a causal mask no real position sees the padding, and MoE routing is
per token, so padding changes no real position's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DernError
from ..stream import HiddenStore, StreamedModel
from ..stream.hidden_store import choose_placement

_PAD_ID = 0  # what padded positions hold (HFLM pads with 0 too); no real position sees them


@dataclass(frozen=True)
class ScoringPlan:
    """What scoring a set of requests will take, known before any layer is read."""
    requests: int
    distinct: int  # requests with different inputs: the others share their result
    batches: int
    padded_tokens: int
    hidden_bytes: int  # the hidden states of all batches between two layers
    placement: str  # "device", "host" or "disk" (HiddenStore)
    layers: int

    def __str__(self) -> str:
        from ..runtime.arguments import format_size

        where = {"device": "on the compute device", "host": "in host memory",
                 "disk": "in a scratch file (host memory holds one batch)"}[self.placement]
        batches = f"{self.batches} batch{'es' if self.batches != 1 else ''}"
        return (f"scoring {self.requests} requests ({self.distinct} distinct inputs, {self.padded_tokens} tokens "
                f"with padding, {batches}) through {self.layers} decoder layers, each read once; "
                f"hidden states between layers: {format_size(self.hidden_bytes)} {where}")


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """The tokens the model reads for a request: HFLM's `(context + continuation)[-(max_length + 1):][:-1]`."""
    if not continuation:
        raise DernError("a loglikelihood request has an empty continuation")
    if len(continuation) > max_length:
        raise DernError(f"a continuation of {len(continuation)} tokens is longer than the model's max_length "
                        f"{max_length}")
    whole = [*context, *continuation]
    if len(whole) < 2:
        raise DernError("a loglikelihood request needs at least one context token")
    return whole[-(max_length + 1):][:-1]


class ContinuationScorer:
    """Scores (context tokens, continuation tokens) requests on one streamed checkpoint (see module doc)."""

    def __init__(self, model: StreamedModel, max_length: int, batch_size: int,
                 placement: str | None = None, scratch_dir: str | Path | None = None):
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self.placement, self.scratch_dir = placement, scratch_dir

    def _batches(self, inputs: list[list[int]]) -> list[list[int]]:
        """Indices of the distinct inputs in batches, longest first (little padding within a batch)."""
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), inputs[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def plan(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> ScoringPlan:
        distinct = {tuple(model_input(c, t, self.max_length)): None for c, t in requests}
        inputs = [list(k) for k in distinct]
        batches = self._batches(inputs)
        padded = sum(len(b) * len(inputs[b[0]]) for b in batches)
        size = padded * int(self.model.model.config.hidden_size) * self.model.dtype.itemsize
        return ScoringPlan(len(requests), len(inputs), len(batches), padded, size,
                           self.placement or choose_placement(size, self.model.device), self.model.num_layers)

    @torch.no_grad()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = True,
              desc: str = "scoring layers") -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether every continuation token is the argmax) for
        each request, in order. Identical requests are computed once."""
        keys = [(tuple(model_input(c, t, self.max_length)), tuple(t)) for c, t in requests]
        unique = list(dict.fromkeys(keys))
        inputs = [list(k[0]) for k in unique]
        batches = self._batches(inputs)
        ids, positions, targets = [], [], []
        for batch in batches:
            width = len(inputs[batch[0]])
            rows = torch.full((len(batch), width), _PAD_ID, dtype=torch.long)
            where, wanted = [], []
            for r, u in enumerate(batch):
                tokens, cont = inputs[u], unique[u][1]
                rows[r, :len(tokens)] = torch.tensor(tokens)
                # Positions len - |cont| .. len - 1 predict the continuation's tokens.
                where.append(torch.arange(len(tokens) - len(cont), len(tokens)) + r * width)
                wanted.append(torch.tensor(cont))
            ids.append(rows)
            positions.append(torch.cat(where))
            targets.append(torch.cat(wanted))
        logprob = [torch.empty(len(p), dtype=torch.float64) for p in positions]
        greedy = [torch.empty(len(p), dtype=torch.bool) for p in positions]
        model, hidden = self.model, int(self.model.model.config.hidden_size)
        with model.ckpt, HiddenStore([(*b.shape, hidden) for b in ids], model.dtype, model.device,
                                     self.placement, self.scratch_dir) as store:
            model.embed(ids, store)
            for i in tqdm(range(model.num_layers), desc=desc, unit="layer", disable=not progress):
                model.run_layer(i, ids, store)
            for b, start, logits in model.logits_at(ids, store, positions):
                target = targets[b][start:start + logits.shape[0]].to(logits.device)
                chosen = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
                logprob[b][start:start + logits.shape[0]] = chosen.double().cpu()
                greedy[b][start:start + logits.shape[0]] = (logits.argmax(dim=-1) == target).cpu()
        results: dict[int, tuple[float, bool]] = {}
        for b, batch in enumerate(batches):
            offset = 0
            for u in batch:
                n = len(unique[u][1])
                ll = float(logprob[b][offset:offset + n].sum())
                if not math.isfinite(ll):
                    raise DernError(f"{model.ckpt.root} gives a non-finite log-likelihood (NaN or Inf): its weights, "
                                    "or the forward in this dtype, give non-finite logits")
                results[u] = (ll, bool(greedy[b][offset:offset + n].all()))
                offset += n
        index = {k: u for u, k in enumerate(unique)}
        return [results[index[k]] for k in keys]
