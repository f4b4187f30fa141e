"""How far a checkpoint's next-token distribution is from a reference's on the same tokens: both models
streamed layer by layer side by side (one decoder layer of each in memory at a time), then compared
position by position: KL divergence, top-1 agreement, and each one's negative log-likelihood."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calib.text import check_vocabulary, note_long_sequences
from ..checkpoint import Checkpoint
from ..errors import DernError, arg
from ..stream import HiddenStore, StreamedModel
from ..stream.executor import batched


@dataclass
class Agreement:
    nll: float  # summed over the predicted tokens, this checkpoint
    reference_nll: float
    tokens: int
    kl_mean: float  # KL(reference || this) per predicted token, nats
    kl_p99: float
    top1: float  # share of positions where both predict the same next token


@torch.no_grad()
def compare_predictions(ref: Checkpoint, ckpt: Checkpoint, ids: torch.Tensor, batch_size: int, device: torch.device,
                        dtype: torch.dtype | None, progress: bool) -> Agreement:
    """Both checkpoints on the token ids [sequences, seq_len], compared at every predicted position."""
    for c in (ref, ckpt):
        check_vocabulary(ids, c.config)
    note_long_sequences(ids, ckpt.config)
    ref_model, model = StreamedModel(ref, device, dtype), StreamedModel(ckpt, device, dtype)
    if ref_model.vocab_size != model.vocab_size:
        raise DernError(f"{arg('reference', str(ref.root))} has a vocabulary of {ref_model.vocab_size} tokens and "
                        f"{ckpt.root} one of {model.vocab_size}: their predictions cannot be compared")
    if ref_model.num_layers != model.num_layers:
        raise DernError(f"{arg('reference', str(ref.root))} has {ref_model.num_layers} decoder layers and {ckpt.root} "
                        f"{model.num_layers}: it is not the model this checkpoint was made from")
    batches = batched(ids, batch_size)
    shapes = [(*b.shape, int(ckpt.config["hidden_size"])) for b in batches]
    with ref, ckpt, HiddenStore(shapes, ref_model.dtype, device) as ref_store, \
            HiddenStore(shapes, model.dtype, device) as store:
        ref_model.embed(batches, ref_store)
        model.embed(batches, store)
        for i in tqdm(range(model.num_layers), desc="eval layers (both models)", unit="layer", disable=not progress):
            ref_model.run_layer(i, batches, ref_store)
            model.run_layer(i, batches, store)
        nll = ref_nll = agree = 0.0
        kls = []
        for (ref_logits, targets), (logits, _) in zip(ref_model.logit_blocks(batches, ref_store),
                                                      model.logit_blocks(batches, store), strict=True):
            ref_log, log = ref_logits.log_softmax(-1), logits.log_softmax(-1)
            kls.append(torch.nn.functional.kl_div(log, ref_log, log_target=True, reduction="none").sum(-1).cpu())
            nll -= float(log.gather(1, targets[:, None]).double().sum())
            ref_nll -= float(ref_log.gather(1, targets[:, None]).double().sum())
            agree += float((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
    kl = torch.cat(kls).double().numpy()
    if not (math.isfinite(nll) and math.isfinite(ref_nll) and np.isfinite(kl).all()):
        raise DernError("the next-token distributions are not finite (NaN or Inf) on this text: the weights, or the "
                        "forward in this dtype, give non-finite logits")
    return Agreement(nll, ref_nll, int(kl.size), float(kl.mean()), float(np.percentile(kl, 99)), agree / kl.size)
