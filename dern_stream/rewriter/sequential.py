"""The sequential rewrite's forward (`sequential=True`): each MoE layer is fitted on the inputs the
*compressed* model gives it, as GPTQ-style pipelines do (docs/method.md, "Beyond the paper").

The dump's token ids (a subset of its sequences, about `fit_tokens` tokens) run through the input
checkpoint's decoder layers one at a time with the streamed forward (stream/executor.py), every MoE layer
already rewritten computing with its compressed experts and router. For MoE layer L this yields:
- x: layer L's MoE inputs in the compressed model (its decoder layers 0..L-1 compressed);
- the target (`sequential_target`): "layer", the original layer's routed output on those same inputs x
  (GPTQ's choice: the layer is fitted where it will run); or "model", its output on the original model's
  inputs of the same tokens (the dump's cached rows), so the fit of layer L also works against what the
  earlier layers changed. ("model" measured worse on the fixtures: docs/quality.md, "Held-out choice, router
  refit and sequential fitting".)
Once layer L is compressed, `advance` runs it with the new experts (the block's output minus the original
routed experts' output plus the compressed ones': shared experts and everything else stay the block's own)
and the result feeds layer L+1. Memory: one decoder layer, plus the hidden states of the chosen sequences
(stream/hidden_store.py). After every layer the hidden states are saved in the staging folder, so a
resumed rewrite continues from the last layer journaled.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..calib import CalibDump
from ..checkpoint import Checkpoint
from ..errors import DernError, arg
from ..experts.forward import Gating, routed_output
from ..experts.segments import ExpertStack
from ..fit.rows import FitRows
from ..stream import HiddenStore, StreamedModel
from ..stream.executor import batched

FOLDER = ".sequential"  # inside the staging folder; removed before the output is committed
_BATCH_TOKENS = 16384  # tokens per batch of the forward


def _hidden_file(folder: Path, after: int) -> Path:
    return folder / f"hidden-after-{after}.pt"


class SequentialForward:
    """See the module doc. `done`: the MoE layers already journaled by an interrupted run (a prefix)."""

    def __init__(self, source: Path, dump: CalibDump, fit_tokens: int, target: str, device: torch.device,
                 staging: Path, done: list[int]):
        self.ckpt = Checkpoint(source)  # its own: the forward releases pages the layer reader prefetched
        self.model = StreamedModel(self.ckpt, device)  # (transformers checked by api.rewrite)
        self.dump, self.device, self.target = dump, device, target
        ids = dump.tokens()
        sequences, seq_len = ids.shape
        wanted = max(1, min(sequences, -(-fit_tokens // seq_len)))
        picked = torch.linspace(0, sequences - 1, wanted).round().long().unique()
        # Row r of a dumped layer is token r of ids.reshape(-1).
        self.rows = (picked[:, None] * seq_len + torch.arange(seq_len)).reshape(-1)
        per_batch = max(1, _BATCH_TOKENS // seq_len)
        self.batches = batched(ids[picked], per_batch)
        hidden = int(self.ckpt.config["hidden_size"])
        self.folder = staging / FOLDER
        self.folder.mkdir(exist_ok=True)
        self.store = HiddenStore([(*b.shape, hidden) for b in self.batches], self.model.dtype, device,
                                 scratch_dir=self.folder)
        self.after = max(done) if done else None  # the last layer whose output `store` holds
        if self.after is None:
            self.model.embed(self.batches, self.store)
        else:
            self.model.prepare(self.batches)
            saved = _hidden_file(self.folder, self.after)
            if not saved.exists():
                raise DernError(f"{saved} is missing: the interrupted sequential rewrite cannot resume; pass "
                                f"{arg('restart', True)} to start it again")
            for b, state in enumerate(torch.load(saved, weights_only=True)):
                self.store[b] = state

    def close(self) -> None:
        self.store.close()
        self.ckpt.release()

    def _run_to(self, index: int) -> None:
        """Run the decoder layers after the last one done up to, not including, `index` (dense layers, or
        MoE layers this rewrite does not fit)."""
        start = 0 if self.after is None else self.after + 1
        for i in range(start, index):
            self.model.run_layer(i, self.batches, self.store)
            self.after = i

    def fit_rows(self, index: int, router: torch.Tensor, bias: torch.Tensor | None, gating: Gating,
                 experts: ExpertStack, holdout: float) -> FitRows:
        """Layer `index`'s inputs in the compressed model, and the target: the original layer's routed output on
        them (`target` "layer"), or on the original model's inputs for the same tokens ("model")."""
        self._run_to(index)
        x = torch.cat(self.model.moe_inputs(index, self.batches, self.store)).float()
        seq_len = self.batches[0].shape[1]
        if self.target == "layer":
            return FitRows(x, routed_output(x, router, bias, gating, experts), holdout, seq_len)
        original = self.dump.rows(index, self.rows, self.device)
        return FitRows(x, routed_output(original, router, bias, gating, experts), holdout, seq_len)

    def advance(self, index: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run layer `index` with its MoE block's routed output replaced by `replace(x)` (the new routed
        experts' output minus the original ones', added to the block's own), and save the result."""
        def moe_output(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).float()
            return y + replace(flat).reshape(y.shape).to(y.dtype)

        self._run_to(index)
        self.model.run_layer(index, self.batches, self.store, moe_output=moe_output)
        self.after = index
        target, tmp = _hidden_file(self.folder, index), self.folder / f".hidden-after-{index}.tmp"
        torch.save([self.store[b].cpu() for b in range(len(self.batches))], tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)  # the rename too is on disk before the layer's journal entry
        finally:
            os.close(folder)



def remove_sequential_files(staging: Path) -> None:
    """The saved hidden states (and any scratch file of a killed run): not part of the output."""
    shutil.rmtree(staging / FOLDER, ignore_errors=True)


def sequential_journaled(staging: Path, index: int) -> None:
    """Layer `index` is on disk and journaled: the states saved after the layers before it are not needed
    (called by the writing thread)."""
    for f in (staging / FOLDER).glob("hidden-after-*.pt"):
        if int(f.stem.rsplit("-", 1)[1]) < index:
            f.unlink(missing_ok=True)
