"""`evaluate`: out-of-core quality checks of a checkpoint, with the same streamed forward as `dump`.

- perplexity on a text (every batch through layer L, then L+1; final norm and lm_head at the end);
- with a reference checkpoint and a text, how far the next-token distributions are from the reference's
  (eval_agreement.py: KL divergence, top-1 agreement, the reference's perplexity);
- per MoE layer, the relative L2 error between a reference checkpoint's MoE block output and this
  checkpoint's, on a dump's cached inputs (one MoE block of each checkpoint in memory at a time).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calib import CalibDump
from ..calib.text import check_vocabulary, note_long_sequences, tokens_from
from ..checkpoint import Checkpoint, resolve_checkpoint
from ..errors import DernError, arg, describe
from ..families import family_for
from ..layout.moe_layers import check_decoder_layers, check_forward_model
from ..runtime.device import resolve_device
from ..runtime.durable_files import write_replacing
from ..runtime.locks import reading_dump
from ..runtime.own_outputs import not_json_of
from ..runtime.targets import JSON_FILE, check_json_target, check_replaceable, expand_user, read_paths
from ..stream import HiddenStore, StreamedModel
from ..stream.executor import batched, parse_dtype
from .agreement import compare_predictions
from .checks import EVAL_FORMAT, check_eval_arguments


@dataclass
class LayerError:
    layer: int
    rel_l2: float  # ||y_ref - y|| / ||y_ref|| over all dump tokens
    tokens: int


@dataclass
class EvalReport:
    checkpoint: str
    perplexity: float | None = None
    nll_per_token: float | None = None
    tokens: int | None = None
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None  # KL(reference || checkpoint) per predicted token, nats
    kl_p99: float | None = None
    top1_agreement: float | None = None  # share of positions where both predict the same next token
    layer_errors: list[LayerError] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def mean_rel_l2(self) -> float | None:
        return sum(e.rel_l2 for e in self.layer_errors) / len(self.layer_errors) if self.layer_errors else None

    def to_json(self) -> dict:
        """Plain JSON: a value too large for a float (an infinite perplexity) is null."""
        record = {"format": EVAL_FORMAT, **asdict(self), "mean_rel_l2": self.mean_rel_l2}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}

    def __str__(self) -> str:
        lines = []
        if self.perplexity is not None:
            lines.append(f"perplexity {self.perplexity:.4f} over {self.tokens} predicted tokens "
                         f"(nll {self.nll_per_token:.5f} per token)")
        if self.kl_mean is not None:
            lines.append(f"against {self.reference} (perplexity {self.reference_perplexity:.4f}): KL divergence "
                         f"{self.kl_mean:.6f} nats per token (99th percentile {self.kl_p99:.6f}), top-1 agreement "
                         f"{self.top1_agreement:.2%}")
        if self.layer_errors:
            lines.append(f"MoE block output error against {self.reference}:")
            lines.append(f"  {'layer':>5}  {'rel L2':>10}  {'tokens':>8}")
            lines += [f"  {e.layer:>5}  {e.rel_l2:>10.6f}  {e.tokens:>8}" for e in self.layer_errors]
            lines.append(f"  {'mean':>5}  {self.mean_rel_l2:>10.6f}")
            lines.append("  (rel L2: ||y - y_ref|| / ||y_ref|| of the block's output on the dump's inputs: 0 is the "
                         "reference's output; 1 is as far from it as no output at all, and more is further still)")
        lines.append(f"{self.checkpoint} evaluated in {self.seconds:.1f} s on {self.device}")
        return "\n".join(lines)


def evaluate(
    src: str | os.PathLike,
    *,
    text: str | os.PathLike | None = None,
    dataset: str | None = None,
    tokens: torch.Tensor | None = None,
    tokenizer: str | os.PathLike | None = None,
    num_tokens: int = 131072,
    seq_len: int = 2048,
    batch_size: int = 8,
    reference: str | os.PathLike | None = None,
    calib: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    json_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    revision: str | None = None,
    reference_revision: str | None = None,
) -> EvalReport:
    """Perplexity of `src` on `text`/`dataset`/`tokens` (up to `num_tokens`); with `reference` too, the KL
    divergence of `src`'s next-token distribution from `reference`'s and their top-1 agreement on those tokens;
    with `reference` and `calib`, the per-MoE-layer output error of `src` against `reference` on the dump's
    inputs.
    With `json_path`, the report is also written there (replacing only an earlier report, with
    `overwrite`). `revision`, `reference_revision`: the branch, tag or commit of `src` and `reference`
    when they are Hub repo ids (default: main)."""
    started = time.perf_counter()
    check_eval_arguments(src, text=text, dataset=dataset, tokens_given=tokens is not None, tokenizer=tokenizer,
                         num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size, reference=reference,
                         calib=calib, device=device, dtype=dtype, json_path=json_path, overwrite=overwrite,
                         revision=revision, reference_revision=reference_revision)
    text, tokenizer, calib = expand_user(text), expand_user(tokenizer), expand_user(calib)
    wants_ppl = text is not None or dataset is not None or tokens is not None
    root = resolve_checkpoint(src, revision)  # once: for a Hub repo id, each call asks the Hub
    if json_path is not None:  # (again: a Hub repo's files are known only now)
        json_path = check_json_target(json_path, overwrite, EVAL_FORMAT, "dern-stream eval", {
            **read_paths("the checkpoint", root), "the reference": reference,
            "the calibration dump": calib, "the text": text, "the tokenizer": tokenizer})
    compute, compute_dtype = resolve_device(device), parse_dtype(dtype)
    ckpt = _open_checked(root)
    report = EvalReport(checkpoint=str(ckpt.root), device=str(compute))
    ref = dump = measured = None
    if reference is not None:  # checked before the perplexity pass, which a bad reference would waste
        ref, dump, measured = _open_reference(ckpt, reference, reference_revision, calib)
        report.reference = str(ref.root)
    if wants_ppl:
        if tokens is None:
            tokens = tokens_from(ckpt.root, text=text, dataset=dataset, tokenizer=tokenizer,
                                 num_tokens=num_tokens, seq_len=seq_len, allow_fewer=True)
        _measure_perplexity(report, ckpt, ref, tokens, batch_size, compute, compute_dtype, progress)
    if dump is not None:
        with reading_dump(dump.path):
            report.layer_errors = layer_errors(ref, ckpt, dump, measured, compute, compute_dtype, progress)
    report.seconds = time.perf_counter() - started
    if json_path is not None:
        _write_report(json_path, report, overwrite)
    return report


def _open_checked(root: Path) -> Checkpoint:
    """The checkpoint at `root`, checked for a streamed forward."""
    ckpt = Checkpoint(root)
    check_forward_model(ckpt)  # a bad config.json is one line, before the tokenizer (which reads it too) loads
    return ckpt


def _open_reference(ckpt: Checkpoint, reference: str | os.PathLike, reference_revision: str | None,
                    calib: str | os.PathLike | None) -> tuple[Checkpoint, CalibDump | None, list[int] | None]:
    """The reference checkpoint, checked to be of `ckpt`'s family; with `calib`, also the dump and the MoE
    layers whose error it can measure (dumped_layers). Returns (reference, dump or None, layers or None)."""
    try:
        ref = Checkpoint(resolve_checkpoint(reference, reference_revision))
        check_decoder_layers(ref)
    except DernError as e:
        raise DernError(f"{arg('reference')}: {describe(e)}") from None
    if family_for(ref.config).model_type != family_for(ckpt.config).model_type:
        raise DernError(f"{arg('reference', str(ref.root))} ({ref.config.get('model_type')}) is not the same "
                        f"family as {ckpt.root} ({ckpt.config.get('model_type')})")
    dump = CalibDump(calib) if calib is not None else None
    measured = None
    if dump is not None:  # (before the perplexity pass too)
        try:
            measured = dumped_layers(ref, ckpt, dump)
        except DernError as e:
            raise DernError(f"{e} (checked against {arg('reference')})") from None
    return ref, dump, measured


def _measure_perplexity(report: EvalReport, ckpt: Checkpoint, ref: Checkpoint | None, tokens: torch.Tensor,
                        batch_size: int, device: torch.device, dtype: torch.dtype | None, progress: bool) -> None:
    """Fill `report` with `ckpt`'s perplexity on `tokens` and, with a reference `ref`, the reference's
    perplexity and how far `ckpt`'s next-token predictions are from it."""
    if ref is not None:
        agreement = compare_predictions(ref, ckpt, tokens, batch_size, device, dtype, progress)
        nll, count = agreement.nll, agreement.tokens
        report.reference_perplexity = _perplexity(agreement.reference_nll / count)
        report.kl_mean, report.kl_p99, report.top1_agreement = (agreement.kl_mean, agreement.kl_p99,
                                                                agreement.top1)
    else:
        nll, count = perplexity_nll(ckpt, tokens, batch_size, device, dtype, progress)
    if not math.isfinite(nll):
        raise DernError(f"{ckpt.root}'s next-token loss is not finite (NaN or Inf): its weights, or the forward "
                        "in this dtype, give non-finite logits")
    report.nll_per_token, report.tokens = nll / count, count
    report.perplexity = _perplexity(nll / count)


def _write_report(json_path: Path, report: EvalReport, overwrite: bool) -> None:
    """Write `report` as JSON to `json_path` (checked by check_json_target), replacing only an earlier report."""
    # Checked again: a file may have appeared there during the evaluation.
    check_replaceable(json_path, JSON_FILE, overwrite, not_json_of(EVAL_FORMAT, "dern-stream eval"),
                      directory=False)
    write_replacing(json_path, (json.dumps(report.to_json(), indent=2) + "\n").encode())


def _perplexity(nll_per_token: float) -> float:
    return math.exp(nll_per_token) if nll_per_token < 700 else math.inf  # (JSON: null)


def perplexity_nll(ckpt: Checkpoint, ids: torch.Tensor, batch_size: int, device: torch.device,
                   dtype: torch.dtype | None, progress: bool) -> tuple[float, int]:
    """Summed next-token NLL and predicted-token count of `ids` [sequences, seq_len], streamed."""
    check_vocabulary(ids, ckpt.config)
    note_long_sequences(ids, ckpt.config)
    model = StreamedModel(ckpt, device, dtype)
    batches = batched(ids, batch_size)
    with ckpt, HiddenStore([(*b.shape, int(ckpt.config["hidden_size"])) for b in batches], model.dtype,
                           device) as store:
        model.embed(batches, store)
        for i in tqdm(range(model.num_layers), desc="eval layers", unit="layer", disable=not progress):
            model.run_layer(i, batches, store)
        return model.nll(batches, store)


@torch.no_grad()
def dumped_layers(ref: Checkpoint, new: Checkpoint, dump: CalibDump) -> list[int]:
    """The MoE layers whose error can be measured: those of the reference the dump holds inputs of, after
    checking that the dump was made from the reference (its routers) and that `new` has them too."""
    family = family_for(ref.config)  # (evaluate checked that `new` is of the same family)
    dump.check_matches(family.model_type, int(ref.config["hidden_size"]), family.num_experts(ref.config))
    ref_model, new_model = StreamedModel(ref, torch.device("cpu")), StreamedModel(new, torch.device("cpu"))
    dumped = set(dump.attrs.get("moe_layers") or [])
    layers = [i for i in ref_model.moe_layers() if i in dumped]
    if not layers:
        raise DernError(f"calibration dump {dump.path} holds no inputs for the reference's MoE layers")
    missing = [i for i in layers if i not in new_model.moe_layers()]
    if missing:
        raise DernError(f"{new.root} has no MoE block in layer(s) {missing}, which the reference has")
    for i in layers:
        dump.check_router(i, ref.load(family.router_name(i)))
    return layers


def layer_errors(ref: Checkpoint, new: Checkpoint, dump: CalibDump, layers: list[int], device: torch.device,
                 dtype: torch.dtype | None, progress: bool) -> list[LayerError]:
    """Each of `layers` (dumped_layers: checked against the dump) measured on the dump's inputs."""
    ref_model, new_model = StreamedModel(ref, device, dtype), StreamedModel(new, device, dtype)
    out = []
    for i in tqdm(layers, desc="layer errors", unit="layer", disable=not progress):
        diff_sq = ref_sq = 0.0
        count = 0
        with ref_model.loaded_moe_block(i) as a, new_model.loaded_moe_block(i) as b:
            for x in dump.chunks(i, device):
                x = x.to(ref_model.dtype)[None]
                ya, yb = _block_output(a(x)).double(), _block_output(b(x.to(new_model.dtype))).double()
                diff_sq += float((ya - yb).pow(2).sum())
                ref_sq += float(ya.pow(2).sum())
                count += x.shape[1]
        if not math.isfinite(diff_sq + ref_sq):
            raise DernError(f"MoE layer {i}: the block outputs are not finite (NaN or Inf) on the dump's inputs")
        out.append(LayerError(i, math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq), count))
    return out


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
