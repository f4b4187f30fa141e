"""`eval`'s checks that need no tensors (paths, option values, an occupied --json target), torch-free: the command
line runs them before torch loads, and `evaluate` starts with them (one set of checks, one set of messages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..calib.checks import check_text_source
from ..calib.dump_files import check_dump_path
from ..checkpoint import Checkpoint
from ..checkpoint.locate import check_checkpoint_ref
from ..errors import DernError, arg
from ..layout.moe_layers import check_forward_model
from ..runtime.arguments import check_device_name, check_dtype_name, check_text_options
from ..runtime.targets import check_json_target, expand_user, read_paths

EVAL_FORMAT = "dern-stream-eval"  # the marker of an `eval --json` file: only such a file is replaced
TASK_EVAL_FORMAT = "dern-stream-task-eval"  # the same for `eval --tasks --json`


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
    local = _check_models(src, revision, reference, reference_revision, device, dtype, reference_forward=False)
    if json_path is None:
        return None
    return check_json_target(json_path, overwrite, EVAL_FORMAT, "dern-stream eval", {
        **(read_paths("the checkpoint", local) if local else {}), "the reference": reference,
        "the calibration dump": calib, "the text": text, "the tokenizer": tokenizer})


def task_names(tasks: str) -> list[str]:
    """--tasks NAME[,NAME...] as a list, refusing an empty name."""
    names = [n.strip() for n in str(tasks).split(",")]
    if not all(names):
        raise DernError(f"{arg('tasks', tasks)}: give task names separated by commas (an empty name was given)")
    return list(dict.fromkeys(names))


def check_task_arguments(src, *, tasks: str, include_path, num_fewshot: int | None, limit: float | None, text,
                         dataset, calib, tokenizer, batch_size: int, reference, device: str, dtype: str, json_path,
                         overwrite: bool, revision: str | None, reference_revision: str | None) -> Path | None:
    """`eval --tasks`'s arguments, before lm-eval or torch loads; returns the --json target, resolved."""
    task_names(tasks)
    if text is not None or dataset is not None or calib is not None:
        given = arg("text") if text is not None else arg("dataset") if dataset is not None else arg("calib")
        raise DernError(f"{arg('tasks')} scores lm-eval tasks; {given} (perplexity, per-layer error) is a separate "
                        "run of eval")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise DernError(f"{arg('include_path', include_path)}: no such directory")
    if num_fewshot is not None and num_fewshot < 0:
        raise DernError(f"{arg('num_fewshot', num_fewshot)}: give 0 or more examples")
    if limit is not None and not limit > 0:
        raise DernError(f"{arg('limit', limit)}: give a number of items (or a share of them, below 1) above 0")
    if batch_size < 1:
        raise DernError(f"{arg('batch_size', batch_size)}: give 1 or more requests per batch")
    if importlib.util.find_spec("lm_eval") is None:
        raise DernError(f"{arg('tasks')} needs lm-evaluation-harness: pip install 'dern-stream[eval]'")
    local = _check_models(src, revision, reference, reference_revision, device, dtype, reference_forward=True)
    if json_path is None:
        return None
    return check_json_target(json_path, overwrite, TASK_EVAL_FORMAT, "dern-stream eval --tasks", {
        **(read_paths("the checkpoint", local) if local else {}), "the reference": reference,
        "the tokenizer": expand_user(tokenizer), "the task folder": expand_user(include_path)})


def _check_models(src, revision: str | None, reference, reference_revision: str | None, device: str, dtype: str,
                  reference_forward: bool) -> Path | None:
    """The device and dtype names, the checkpoint (and the reference: checked for the streamed forward too with
    `reference_forward`) where they are local; returns the checkpoint's local path (None for a Hub repo id, whose
    files are known only once fetched: the command checks it then)."""
    check_device_name(device)
    check_dtype_name(dtype)
    local = check_checkpoint_ref(src, revision)
    if local is not None:
        check_forward_model(Checkpoint(local))
    if reference is not None:
        try:
            ref_local = check_checkpoint_ref(reference, reference_revision)
            if reference_forward and ref_local is not None:
                check_forward_model(Checkpoint(ref_local))
        except DernError as e:
            raise DernError(f"{arg('reference')}: {e}") from None
    return local
