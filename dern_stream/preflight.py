"""The checks of `dump`, `eval` and `verify` that need no tensors (paths, option values, an occupied target),
torch-free: the command line runs them before torch loads, so a refusal answers at once, and the commands
themselves start with them (one set of checks, one set of messages)."""

from __future__ import annotations

import os
from pathlib import Path

from .calib.dump_files import check_dump_path, not_a_dump
from .checkpoint.locate import check_checkpoint_ref
from .errors import DernError, arg
from .options import check_device_name, check_dtype_name, check_text_options, whole
from .runtime.targets import check_apart, check_json_target, expand_user, read_paths

EVAL_FORMAT = "dern-stream-eval"  # the marker of an `eval --json` file: only such a file is replaced


def check_calib_choice(options, calib: Path | None) -> None:
    """A rewrite's (or plan's) calibration dump against its options (RewriteOptions): needed unless the experts are
    ranked by router norm, which no option reading the layers' inputs goes with; and readable."""
    if options.importance == "router-norm":
        if options.uses_layer_outputs:
            raise DernError(f"{arg('method', options.method)} with these options needs the layers' cached inputs: "
                            f"pass {arg('calib', metavar='DUMP')} instead of {arg('importance', 'router-norm')}")
        if calib is not None:
            raise DernError(f"{arg('importance', 'router-norm')} ignores the calibration dump; pass one or the other")
        return
    if calib is None:
        raise DernError(f"{arg('calib', metavar='DUMP')} is required (a calibration dump of the MoE layers' inputs, "
                        f"see the README), or pass {arg('importance', 'router-norm')} for the weaker parameter-only "
                        "ranking")
    check_dump_path(calib)


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
    out_path = Path(out).expanduser().resolve()
    reads = {**(read_paths("the input checkpoint", local) if local is not None else {}), "the text": text,
             "the tokenizer": tokenizer}
    check_apart(out_path, "DUMP", reads)
    reason = not_a_dump(out_path) if os.path.lexists(out_path) else None
    if reason is not None:
        raise DernError(f"DUMP {out_path} {reason}; choose another path ({arg('overwrite', True)} replaces only an "
                        "earlier dump)")
    return out_path


def check_eval_arguments(src, *, text, dataset, tokens_given: bool, tokenizer, num_tokens: int, seq_len: int,
                         batch_size: int, reference, calib, device: str, dtype: str, json_path, overwrite: bool,
                         revision: str | None, reference_revision: str | None) -> Path | None:
    """`eval`'s arguments; returns the --json target, resolved (None without one)."""
    check_text_options(num_tokens, seq_len, batch_size)
    text, tokenizer, calib = expand_user(text), expand_user(tokenizer), expand_user(calib)
    wants_ppl = text is not None or dataset is not None or tokens_given
    if calib is not None and reference is None:
        raise DernError(f"{arg('calib')} needs {arg('reference', metavar='IN')}: the per-layer error compares this "
                        "checkpoint's MoE blocks with the reference's on the dump's inputs")
    if not wants_ppl and reference is None:
        raise DernError(f"nothing to evaluate: give {arg('text')} or {arg('dataset')} for perplexity, or "
                        f"{arg('reference', metavar='IN')} with {arg('calib', metavar='DUMP')}")
    if reference is not None and calib is None and not wants_ppl:
        raise DernError(f"with {arg('reference')}, give {arg('text')} or {arg('dataset')} (KL divergence and top-1 "
                        f"agreement with it) and/or {arg('calib', metavar='DUMP')} (per-layer error)")
    if wants_ppl and not tokens_given:
        check_text_source(text, dataset)
    if calib is not None:
        check_dump_path(calib)
    check_device_name(device)
    check_dtype_name(dtype)
    local = check_checkpoint_ref(src, revision)
    if reference is not None:
        try:
            check_checkpoint_ref(reference, reference_revision)
        except DernError as e:
            raise DernError(f"{arg('reference')}: {e}") from None
    if json_path is None:
        return None
    return check_json_target(json_path, overwrite, EVAL_FORMAT, "dern-stream eval", {
        **(read_paths("the checkpoint", local) if local else {}), "the reference": reference,
        "the calibration dump": calib, "the text": text, "the tokenizer": tokenizer})


def check_verify_arguments(out, against, revision: str | None) -> Path:
    """`verify`'s arguments; returns OUT resolved."""
    root = Path(out).expanduser().resolve()
    if not root.is_dir():
        raise DernError(f"{root} is not a directory")
    if against is not None:
        check_checkpoint_ref(against, revision)
    return root
