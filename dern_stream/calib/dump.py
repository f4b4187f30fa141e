"""`dump`: the calibration dump, made layer by layer with the streamed forward (never the whole model
in memory), resumable after an interruption from the last finished layer."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import Checkpoint, resolve_checkpoint
from ..errors import DernError, NonFinite, arg, describe
from ..families import Family
from ..layout.moe_layers import check_forward_model, moe_layer_indices
from ..runtime.arguments import choice, whole
from ..runtime.device import device_name, resolve_device
from ..runtime.locks import DirLock
from ..runtime.targets import check_apart, expand_user, read_paths
from ..stream import HiddenStore, StreamedModel
from ..stream.executor import batched, parse_dtype
from . import CalibWriter, tensor_sha256
from .checks import check_dump_arguments
from .dump_files import FORMAT, not_a_dump
from .dump_workers import dump_in_workers, split_sequences
from .text import check_vocabulary, file_sha256, note_long_sequences, tokens_from

log = logging.getLogger("dern_stream")


@dataclass
class DumpSummary:
    path: Path
    moe_layers: int
    sequences: int
    seq_len: int
    resumed_after_layer: int | None
    seconds: float
    device: str

    def __str__(self) -> str:
        resumed = "" if self.resumed_after_layer is None else f" (resumed after layer {self.resumed_after_layer})"
        return (f"done: {self.moe_layers} MoE layers x {self.sequences * self.seq_len} tokens "
                f"({self.sequences} x {self.seq_len}) -> {self.path}{resumed} in {self.seconds:.1f} s on {self.device}")


def dump(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    text: str | os.PathLike | None = None,
    dataset: str | None = None,
    tokens: torch.Tensor | None = None,
    tokenizer: str | os.PathLike | None = None,
    num_tokens: int = 262144,
    seq_len: int = 2048,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    store_dtype: str = "float16",
    chunk_tokens: int = 4096,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    revision: str | None = None,
) -> DumpSummary:
    """Write the calibration dump `out` for checkpoint `src` from `text` (plain or .jsonl), a `datasets`
    `dataset`, or given `tokens` [sequences, seq_len]. An interrupted dump is continued by the same call.

    `workers=N` splits the sequences among N worker processes (one GPU each where there are N and
    `device` names no index), each streaming the whole model over its share: the same dump, N times the
    reading of the checkpoint. Interrupted, such a dump starts again from its first layer.

    `revision`: the branch, tag or commit of `src` when it is a Hub repo id (default: main)."""
    started = time.perf_counter()
    out_path = check_dump_arguments(src, out, text=text, dataset=dataset, tokens_given=tokens is not None,
                                    tokenizer=tokenizer, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size,
                                    device=device, dtype=dtype, workers=workers, revision=revision)
    text, tokenizer = expand_user(text), expand_user(tokenizer)
    whole("chunk_tokens", chunk_tokens)
    choice("store_dtype", store_dtype, ("float16", "float32"))
    ckpt, family, moe_layers = _open_checkpoint(src, revision, out_path, text, tokenizer)
    compute, model = _streamed_model(ckpt, moe_layers, device, dtype)
    # What computes the forward: a dump resumed on another device or in another dtype would mix two models' rows.
    forward = f"{device_name(compute)}, {str(model.dtype).removeprefix('torch.')}"
    request = _Request(text, dataset, tokens, tokenizer, num_tokens, seq_len, store_dtype, chunk_tokens, forward)
    writer, ids, resumed, lock = _open_or_resume(out_path, ckpt, family, moe_layers, request, overwrite)
    if workers > 1 and resumed is None:
        try:
            _dump_in_workers(ckpt, family, writer, ids, moe_layers, batch_size, compute, dtype, workers, progress)
        finally:
            ckpt.release()
            lock.release()
    else:
        _dump_streamed(out_path, ckpt, family, model, writer, ids, moe_layers, resumed, lock, batch_size, progress)
    return DumpSummary(out_path, len(moe_layers), ids.shape[0], ids.shape[1], resumed,
                       time.perf_counter() - started, str(compute))


def _open_checkpoint(src: str | os.PathLike, revision: str | None, out_path: Path, text: str | os.PathLike | None,
                     tokenizer: str | os.PathLike | None) -> tuple[Checkpoint, Family, list[int]]:
    """The checkpoint `src`, checked for a streamed forward, with its family and the MoE layers a forward
    reaches; after checking that the dump `out_path` is apart from everything it reads."""
    ckpt = Checkpoint(resolve_checkpoint(src, revision))
    family = check_forward_model(ckpt)
    # Layers past the decoder (DeepSeek-V3's multi-token prediction) are never reached by a forward.
    moe_layers = moe_layer_indices(ckpt, family, below=family.decoder_layers(ckpt.config))
    check_apart(out_path, "DUMP", {**read_paths("the input checkpoint", ckpt.root), "the text": text,
                                   "the tokenizer": tokenizer})  # (again: a Hub repo's files are known only now)
    return ckpt, family, moe_layers


def _streamed_model(ckpt: Checkpoint, moe_layers: list[int], device: str,
                    dtype: str) -> tuple[torch.device, StreamedModel]:
    """The compute device and the streamed model of `ckpt` on it, after checking that the model has its MoE
    blocks in `moe_layers`, where the checkpoint has its routers."""
    compute, compute_dtype = resolve_device(device), parse_dtype(dtype)  # bad options fail before any work
    model = StreamedModel(ckpt, compute, compute_dtype)  # meta device: cheap, and checks config.json
    if model.moe_layers() != moe_layers:
        raise DernError(f"the checkpoint's routers (layers {moe_layers}) and the model transformers builds from "
                        f"config.json (MoE layers {model.moe_layers()}) disagree")
    return compute, model


def _dump_streamed(out_path: Path, ckpt: Checkpoint, family: Family, model: StreamedModel, writer: CalibWriter,
                   ids: torch.Tensor, moe_layers: list[int], resumed: int | None, lock: DirLock, batch_size: int,
                   progress: bool) -> None:
    """Run the decoder layers one after another over all batches in this process, appending each MoE layer's
    inputs to `writer` and saving the residual stream after each layer so that an interrupted dump resumes
    after its last finished layer. Releases `lock` on every path, and `ckpt` and the store once it is made."""
    try:
        batches = batched(ids, batch_size)
        hidden = int(ckpt.config["hidden_size"])
        store = HiddenStore([(*b.shape, hidden) for b in batches], model.dtype, model.device,
                            scratch_dir=out_path.parent)
    except BaseException:
        lock.release()
        raise
    last = moe_layers[-1]
    try:
        start = _first_layer(out_path, model, writer, batches, store, resumed)
        for i in tqdm(range(start, last + 1), desc="dump layers", unit="layer", disable=not progress,
                      initial=start, total=last + 1):
            _dump_layer(i, ckpt, family, model, writer, batches, store, moe_layers)
            if i < last:
                rows = (ids.shape[0], ids.shape[1], hidden)
                writer.save_residual(i, rows, model.dtype, (store[b] for b in range(len(batches))))
        writer.finish()
    except KeyboardInterrupt:
        log.warning("interrupted: rerun the same command to continue %s after the last finished layer", out_path)
        raise
    except NonFinite:
        raise
    except (DernError, OSError) as e:  # a full disk, a missing tensor found at layer 20...
        raise DernError(f"{describe(e)} (the layers finished so far are kept in {out_path}: run the same command "
                        "again to resume)") from e
    finally:
        store.close()
        ckpt.release()
        lock.release()


def _first_layer(out_path: Path, model: StreamedModel, writer: CalibWriter, batches: list[torch.Tensor],
                 store: HiddenStore, resumed: int | None) -> int:
    """Fill `store` with the residual stream the next layer reads (the embeddings, or the state saved after
    layer `resumed`) and return that layer."""
    if resumed is None:
        model.embed(batches, store)
        return 0
    model.prepare(batches)
    for b, state in enumerate(writer.load_residual([b.shape[0] for b in batches])):
        store[b] = state
    log.warning("note: resuming %s after decoder layer %d", out_path, resumed)
    return resumed + 1


def _dump_layer(i: int, ckpt: Checkpoint, family: Family, model: StreamedModel, writer: CalibWriter,
                batches: list[torch.Tensor], store: HiddenStore, moe_layers: list[int]) -> None:
    """Run decoder layer `i` over all batches; for an MoE layer, record its inputs and finish it in the dump."""
    if i in moe_layers:
        sha = tensor_sha256(ckpt.load(family.router_name(i)))
        model.run_layer(i, batches, store, lambda _b, x, i=i, sha=sha: writer.append(i, x, router_sha256=sha))
        writer.finish_layer(i)
    else:
        model.run_layer(i, batches, store)


def _dump_in_workers(ckpt: Checkpoint, family: Family, writer: CalibWriter, ids: torch.Tensor, moe_layers: list[int],
                     batch_size: int, compute: torch.device, dtype: str, workers: int, progress: bool) -> None:
    parts = split_sequences(ids.shape[0], ids.shape[1], batch_size, writer.chunk_tokens, workers)
    if len(parts) < workers:
        log.warning("note: %d sequences make %d parts of whole batches and chunks: %d workers", ids.shape[0],
                    len(parts), len(parts))
    for i in moe_layers:  # at full size, so each worker writes its own rows
        writer.create_layer(i, ids.numel(), tensor_sha256(ckpt.load(family.router_name(i))))
    try:
        with tqdm(total=len(parts) * (moe_layers[-1] + 1), desc=f"dump layers x {len(parts)} workers", unit="layer",
                  disable=not progress) as bar:
            dump_in_workers(ckpt.root, writer.path, ids, parts, moe_layers, batch_size, compute, dtype, bar.update)
    except NonFinite:
        raise
    except (DernError, OSError) as e:
        raise DernError(f"{describe(e)} (run the same command again to start the dump again)") from e
    for i in moe_layers:
        writer.finish_layer(i)
    writer.finish()


@dataclass(frozen=True)
class _Request:
    text: str | os.PathLike | None
    dataset: str | None
    tokens: torch.Tensor | None
    tokenizer: str | os.PathLike | None
    num_tokens: int
    seq_len: int
    store_dtype: str
    chunk_tokens: int
    forward: str  # the device and dtype of the forward

    def provenance(self, ckpt: Checkpoint) -> dict:
        """What must match for an interrupted dump to be continued (and what the dump records)."""
        num_tokens, seq_len = self.num_tokens, self.seq_len
        if self.tokens is not None:
            source, sha = "tokens given by the caller", tensor_sha256(self.tokens.to(torch.int64))
            num_tokens, seq_len = self.tokens.numel(), self.tokens.shape[-1]
        elif self.text is not None:
            text = Path(self.text)
            source, sha = f"text:{text.resolve()}", file_sha256(text) if text.is_file() else None
        else:
            source, sha = f"dataset:{self.dataset}", None
        return {
            "checkpoint_fingerprint": ckpt.fingerprint(), "source": source, "source_sha256": sha,
            "tokenizer": None if self.tokens is not None else str(self.tokenizer or ckpt.root),
            "num_tokens": num_tokens, "seq_len": seq_len, "dtype": self.store_dtype, "forward": self.forward,
            "dern_stream": __version__,
        }


def _open_or_resume(path: Path, ckpt: Checkpoint, family, moe_layers: list[int], request: _Request,
                    overwrite: bool) -> tuple[CalibWriter, torch.Tensor, int | None, DirLock]:
    """A fresh writer with the token ids, or the interrupted dump at `path` when it was started by the
    same command on the same checkpoint; with the lock on `path`, held until the dump ends. Returns
    (writer, ids, resumed_after_layer or None, lock). `path` is a dump or empty if it exists (checked)."""
    provenance = request.provenance(ckpt)
    ids = None if not overwrite and _holds_data(path) else _request_tokens(ckpt, request)  # before anything is made
    try:
        path.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise DernError(f"cannot create DUMP {path}: {e.strerror}") from None
    lock = DirLock(path, f"DUMP {path} is in use by another dern-stream process (a dump writing it, or a rewrite "
                         "or eval reading it); wait for it to finish")
    try:
        # Look again, under the lock: another dump may have been at work until now.
        reason = not_a_dump(path)
        if reason is not None:
            raise DernError(f"DUMP {path} {reason}; choose another path")
        if not overwrite and _holds_data(path):  # resumed if it is this command's (a complete one is refused)
            writer = _resumable(path, provenance)
            after = writer.resume_point()
            for key in list(writer.inputs.array_keys()):  # layers past the saved state are redone
                if after is None or int(key) > after:
                    del writer.inputs[key]
            return writer, writer.tokens(), after, lock
        if ids is None:  # the dump we meant to resume was removed meanwhile
            ids = _request_tokens(ckpt, request)
        writer = CalibWriter(
            path, model_type=family.model_type, hidden_size=int(ckpt.config["hidden_size"]),
            num_experts=family.num_experts(ckpt.config), moe_layers=moe_layers,
            checkpoint_fingerprint=provenance["checkpoint_fingerprint"], provenance=provenance,
            dtype=request.store_dtype, chunk_tokens=request.chunk_tokens, overwrite=True,
        )
        writer.write_tokens(ids)
        return writer, ids, None, lock
    except BaseException:
        if created:  # made by this run a moment ago: nothing of anyone's is in it
            shutil.rmtree(path, ignore_errors=True)
        lock.release()
        raise


def _holds_data(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _request_tokens(ckpt: Checkpoint, request: _Request) -> torch.Tensor:
    if request.tokens is not None:
        ids = request.tokens.to(torch.int64)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise DernError("tokens must be a [sequences, seq_len] tensor with seq_len >= 2")
    else:
        ids = tokens_from(ckpt.root, text=request.text, dataset=request.dataset, tokenizer=request.tokenizer,
                          num_tokens=request.num_tokens, seq_len=request.seq_len)
    check_vocabulary(ids, ckpt.config)
    note_long_sequences(ids, ckpt.config)
    return ids


# provenance keys that must match for a dump to be continued
_RESUME_KEYS = ("checkpoint_fingerprint", "source", "source_sha256", "tokenizer", "num_tokens", "seq_len", "dtype",
                "forward")


def _resumable(path: Path, provenance: dict) -> CalibWriter:
    import zarr

    try:
        attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    except Exception:  # zarr raises many types for a path that is not a store
        raise DernError(f"{path} exists and is not a calibration dump; choose another path") from None
    if attrs.get("format") != FORMAT:
        raise DernError(f"{path} exists and is not a calibration dump; choose another path")
    if attrs.get("complete"):
        raise DernError(f"dump {path} already exists and is complete; pass {arg('overwrite', True)} to make it again")
    before = attrs.get("provenance") or {}
    changed = [k for k in _RESUME_KEYS if before.get(k) != provenance.get(k)]
    if changed:
        detail = f" ({before.get('forward')} -> {provenance['forward']})" if "forward" in changed else ""
        changed = [k if k != "forward" else "forward device or dtype" for k in changed]
        raise DernError(f"{path} holds an interrupted dump made with a different {', '.join(changed)}{detail}; "
                        f"rerun that command to resume it, or pass {arg('overwrite', True)} to start again")
    return CalibWriter.reopen(path)
