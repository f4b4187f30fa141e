"""`dump`'s checks that need no tensors (paths, option values, an occupied target), torch-free: the command line
runs them before torch loads, and `dump` starts with them (one set of checks, one set of messages)."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import Checkpoint
from ..checkpoint.locate import check_checkpoint_ref
from ..errors import DernError, arg
from ..layout.moe_layers import check_forward_model
from ..runtime.arguments import check_device_name, check_dtype_name, check_text_options, whole
from ..runtime.targets import check_apart, expand_user, read_paths
from .dump_files import not_a_dump


def check_text_source(text: Path | None, dataset: str | None) -> None:
    """Exactly one of a text file (that exists) and a dataset name."""
    if (text is None) == (dataset is None):
        raise DernError(f"give exactly one of {arg('text', metavar='FILE')} or {arg('dataset', metavar='NAME')}")
    if text is not None and not Path(text).is_file():
        raise DernError(f"text file {text} does not exist")


def check_dump_arguments(src, out, *, text, dataset, tokens_given: bool, tokenizer, num_tokens: int, seq_len: int,
                         batch_size: int, device: str, dtype: str, workers: int, revision: str | None) -> Path:
    """`dump`'s arguments; returns DUMP's resolved path."""
    check_text_options(num_tokens, seq_len, batch_size)
    whole("workers", workers)
    text, tokenizer = expand_user(text), expand_user(tokenizer)
    if not tokens_given:
        check_text_source(text, dataset)
    check_device_name(device)
    check_dtype_name(dtype)
    local = check_checkpoint_ref(src, revision)
    if local is not None:  # (a Hub repo's files are known only once fetched: dump checks it then)
        check_forward_model(Checkpoint(local))
    out_path = Path(out).expanduser().resolve()
    reads = {**(read_paths("the input checkpoint", local) if local is not None else {}), "the text": text,
             "the tokenizer": tokenizer}
    check_apart(out_path, "DUMP", reads)
    reason = not_a_dump(out_path) if os.path.lexists(out_path) else None
    if reason is not None:
        raise DernError(f"DUMP {out_path} {reason}; choose another path ({arg('overwrite', True)} replaces only an "
                        "earlier dump)")
    return out_path
