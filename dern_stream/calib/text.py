"""Calibration and evaluation text: read documents, tokenize with the checkpoint's tokenizer, pack
into fixed-length sequences.

Documents are the records of a `.jsonl` file (its `text` field), blocks of whole lines of a plain
text file, or the `text` field of a `datasets` dataset. Each is tokenized without special tokens
and followed by EOS; the stream is cut into sequences of `seq_len` tokens, each starting with BOS
when the tokenizer has one. Reading stops as soon as enough tokens are in hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import DernError, arg
from ..runtime.optional_packages import require_transformers
from .checks import check_text_source

_PLAIN_BLOCK_CHARS = 64 << 10  # plain text is tokenized in blocks of whole lines of about this size


def load_tokenizer(src: Path, tokenizer: str | Path | None = None):
    AutoTokenizer = require_transformers().AutoTokenizer  # noqa: N806

    where = tokenizer or src
    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)  # never a prompt, never their code
    except Exception as e:  # noqa: BLE001 - tokenizer loading raises many types (strict config validation too)
        if tokenizer is None:
            raise DernError(f"{src} has no tokenizer that transformers can load ({str(e).splitlines()[0][:120]}); "
                            f"pass {arg('tokenizer', metavar='PATH')} (a directory or file with the model's "
                            "tokenizer)") from None
        raise DernError(f"cannot load tokenizer {tokenizer}: {str(e).splitlines()[0][:160]}") from None


def text_documents(path: str | Path) -> Iterator[str]:
    path = Path(path)  # (tokens_from checked that it is a file)
    with open(path, encoding="utf-8", errors="replace") as f:
        if path.suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DernError(f"{path} line {n} is not JSON (a .jsonl file holds one JSON object per line)") \
                        from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DernError(f"{path} line {n} has no string field 'text'")
                yield record["text"]
        else:
            block: list[str] = []
            size = 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= _PLAIN_BLOCK_CHARS:
                    yield "".join(block)
                    block, size = [], 0
            if block:
                yield "".join(block)


def dataset_documents(name: str, split: str = "train") -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DernError(f"{arg('dataset')} needs the datasets library: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types for a missing or unreachable dataset
        raise DernError(f"cannot load dataset {name} ({split}): {str(e).splitlines()[0][:160]}") from None
    for record in ds:
        text = record.get("text")
        if not isinstance(text, str):
            raise DernError(f"dataset {name} records have no string field 'text'")
        yield text


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_tokens(documents: Iterator[str], tokenizer, num_tokens: int, seq_len: int, source: str,
                allow_fewer: bool = False) -> torch.Tensor:
    """[num_tokens // seq_len, seq_len] int64 token ids. Text too short is an error, unless
    `allow_fewer` (evaluation), which takes the whole sequences there are."""
    if seq_len < 2:
        raise DernError(f"{arg('seq_len', seq_len)} is too short (at least 2)")
    sequences = num_tokens // seq_len
    if sequences < 1:
        raise DernError(f"{arg('num_tokens', num_tokens)} is less than one sequence of {arg('seq_len', seq_len)}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = seq_len - (bos is not None)
    need = sequences * body
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need and allow_fewer and len(stream) >= body:
        sequences, need = len(stream) // body, len(stream) // body * body
    if len(stream) < need:
        raise DernError(f"{source} gives {len(stream)} tokens; {sequences} sequences of {seq_len} need {need} "
                        f"(lower {arg('num_tokens')} or give more text)")
    ids = torch.tensor(stream[:need], dtype=torch.int64).view(sequences, body)
    if bos is not None:
        ids = torch.cat([torch.full((sequences, 1), bos, dtype=torch.int64), ids], dim=1)
    return ids


def tokens_from(src: Path, *, text: str | Path | None, dataset: str | None, tokenizer: str | Path | None,
                num_tokens: int, seq_len: int, allow_fewer: bool = False) -> torch.Tensor:
    """Token ids [sequences, seq_len] from `--text` or `--dataset`."""
    check_text_source(Path(text) if text is not None else None, dataset)
    tok = load_tokenizer(src, tokenizer)
    if text is not None:
        docs = text_documents(text)
    else:
        name, _, split = dataset.partition(":")
        docs = dataset_documents(name, split or "train")
    return pack_tokens(docs, tok, num_tokens, seq_len, str(text or dataset), allow_fewer)


def check_vocabulary(ids: torch.Tensor, config: dict) -> None:
    """Token ids from another model's tokenizer would index past the embedding table."""
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise DernError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab}); "
                        f"is {arg('tokenizer')} the model's own?")


def note_long_sequences(ids: torch.Tensor, config: dict) -> None:
    """A note (not an error: RoPE scaling can extend a model) when sequences are longer than config.json's
    max_position_embeddings, the positions the model was built for."""
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and ids.dim() == 2 and ids.shape[1] > limit:
        logging.getLogger("dern_stream").warning(
            "note: sequences of %d tokens are longer than the model's max_position_embeddings (%d); positions "
            "past it are outside what it was built for (--seq-len %d stays within)", ids.shape[1], limit, limit)
