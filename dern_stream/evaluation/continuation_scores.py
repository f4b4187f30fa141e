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
from ..runtime.arguments import format_size
from ..stream import HiddenStore, StreamedModel
from ..stream.hidden_store import choose_placement

_PAD_ID = 0  # what padded positions hold (HFLM pads with 0 too); no real position sees them
_WIDTH_STEP = 64


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
    if not context:  # (HFLM asserts it: lm-eval gives an empty context its prefix token)
        raise DernError("a loglikelihood request has no context token (a context that encodes to nothing)")
    return [*context, *continuation][-(max_length + 1):][:-1]


class ContinuationScorer:
    """Scores (context tokens, continuation tokens) requests on one streamed checkpoint (see module doc)."""

    def __init__(self, model: StreamedModel, max_length: int, batch_size: int,
                 placement: str | None = None, scratch_dir: str | Path | None = None):
        self.model, self.max_length, self.batch_size = model, max_length, batch_size
        self.placement, self.scratch_dir = placement, scratch_dir

    def _batches(self, inputs: list[tuple[int, ...]]) -> list[list[int]]:
        """Indices of the distinct inputs in batches, longest first (little padding within a batch)."""
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), inputs[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _width(self, longest: int) -> int:
        """A batch's padded width: its longest input rounded up to a multiple of _WIDTH_STEP (within max_length), so
        that few distinct shapes are run: the streamed model keeps each shape's layer arguments (masks, positions)."""
        return max(longest, min(-(-longest // _WIDTH_STEP) * _WIDTH_STEP, self.max_length))

    def plan(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> ScoringPlan:
        inputs = list(dict.fromkeys(tuple(model_input(c, t, self.max_length)) for c, t in requests))
        batches = self._batches(inputs)
        padded = sum(len(b) * self._width(len(inputs[b[0]])) for b in batches)
        size = padded * int(self.model.text_config.hidden_size) * self.model.dtype.itemsize
        return ScoringPlan(len(requests), len(inputs), len(batches), padded, size,
                           self.placement or choose_placement(size, self.model.device), self.model.num_layers)

    @torch.no_grad()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = True,
              desc: str = "scoring layers") -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether every continuation token is the argmax) for
        each request, in order. Requests with the same input (the choices of a one-token answer, repeats) share one
        row of the forward, as HFLM's logits cache shares them."""
        keys = [(tuple(model_input(c, t, self.max_length)), tuple(t)) for c, t in requests]
        by_input: dict[tuple[int, ...], list[tuple]] = {}
        for key in dict.fromkeys(keys):
            by_input.setdefault(key[0], []).append(key)
        inputs = list(by_input)
        batches = self._batches(inputs)
        ids, positions, targets, where = [], [], [], {}
        for b, batch in enumerate(batches):
            width = self._width(len(inputs[batch[0]]))
            rows = torch.full((len(batch), width), _PAD_ID, dtype=torch.long)
            rows_at, wanted, offset = [], [], 0
            for r, u in enumerate(batch):
                tokens = inputs[u]
                rows[r, :len(tokens)] = torch.tensor(tokens)
                for key in by_input[tokens]:  # positions len - |cont| .. len - 1 predict the continuation
                    cont = key[1]
                    rows_at.append(torch.arange(len(tokens) - len(cont), len(tokens)) + r * width)
                    wanted.append(torch.tensor(cont))
                    where[key] = (b, offset, len(cont))
                    offset += len(cont)
            ids.append(rows)
            positions.append(torch.cat(rows_at))
            targets.append(torch.cat(wanted))
        logprob, greedy = self._run(ids, positions, targets, progress, desc)
        results = {}
        for key, (b, offset, n) in where.items():
            ll = float(logprob[b][offset:offset + n].sum())
            if not math.isfinite(ll):
                raise DernError(f"{self.model.ckpt.root} gives a non-finite log-likelihood (NaN or Inf): its weights, "
                                "or the forward in this dtype, give non-finite logits")
            results[key] = (ll, bool(greedy[b][offset:offset + n].all()))
        return [results[k] for k in keys]

    def _run(self, ids: list[torch.Tensor], positions: list[torch.Tensor], targets: list[torch.Tensor],
             progress: bool, desc: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every batch through every layer, then the log-probability of each target at its position and whether it
        is the argmax there."""
        logprob = [torch.empty(len(p), dtype=torch.float64) for p in positions]
        greedy = [torch.empty(len(p), dtype=torch.bool) for p in positions]
        model, hidden = self.model, int(self.model.text_config.hidden_size)
        try:
            with model.ckpt, HiddenStore([(*b.shape, hidden) for b in ids], model.dtype, model.device,
                                         self.placement, self.scratch_dir) as store:
                model.embed(ids, store)
                for i in tqdm(range(model.num_layers), desc=desc, unit="layer", disable=not progress):
                    model.run_layer(i, ids, store)
                for b, start, logits in model.logits_at(ids, store, positions):
                    end = start + logits.shape[0]
                    target = targets[b][start:end].to(logits.device)
                    logprob[b][start:end] = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0].cpu()
                    greedy[b][start:end] = (logits.argmax(dim=-1) == target).cpu()
        finally:
            model.forget_shapes()
        return logprob, greedy
