"""`eval --tasks`: lm-evaluation-harness tasks scored out of core with the "dern-stream" lm-eval model
(lm_eval_model.py), optionally against a reference checkpoint, item by item (paired.py).

The tasks are resolved and their request types checked before any layer is read: a task that generates text
is refused in one line. lm-eval then builds the requests, and each request type is scored in one streamed pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DernError, arg
from ..runtime.durable_files import write_replacing
from ..runtime.own_outputs import not_json_of
from ..runtime.targets import JSON_FILE, check_replaceable
from .checks import TASK_EVAL_FORMAT, check_task_arguments, task_names
from .paired import ScoreRow, format_rows, score_rows

GENERATING = "generate_until"


@dataclass
class TaskReport:
    checkpoint: str
    tasks: list[str]
    rows: list[ScoreRow]
    results: dict  # lm-eval's results dict of the checkpoint (without the per-item samples)
    reference: str | None = None
    reference_results: dict | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": TASK_EVAL_FORMAT, "checkpoint": self.checkpoint, "tasks": self.tasks,
                "reference": self.reference, "scores": [r.to_json() for r in self.rows], "seconds": self.seconds,
                **self.results, "reference_results": self.reference_results}

    def __str__(self) -> str:
        lines = [format_rows(self.rows, self.checkpoint, self.reference), *self.notes,
                 f"{len(self.tasks)} task(s) scored in {self.seconds:.1f} s"]
        return "\n".join(lines)


def load_tasks(names: list[str], include_path: str | os.PathLike | None):
    """(lm-eval's TaskManager, the leaf tasks by name) for `names`, refusing unknown names and tasks that generate
    text. Built-in tasks are indexed only when the names are not all found in `include_path` (indexing takes
    seconds)."""
    from lm_eval.tasks import TaskManager

    paths = str(Path(include_path).expanduser()) if include_path is not None else None
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(not manager.match_tasks([n]) for n in names):
        manager = TaskManager(include_path=paths)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        where = f" (nor in {arg('include_path')} {paths})" if paths else ""
        raise DernError(f"lm-eval knows no task {', '.join(unknown)}{where}: `lm_eval ls tasks` lists them")
    try:
        loaded = manager.load(manager.match_tasks(names))
    except Exception as e:  # a task's YAML or dataset that lm-eval cannot load
        raise DernError(f"lm-eval cannot load the task(s) {', '.join(names)}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    generating = sorted(n for n, t in loaded["tasks"].items() if t.OUTPUT_TYPE == GENERATING)
    if generating:
        raise DernError(f"task(s) {', '.join(generating)} generate text ({GENERATING}), which needs every layer for "
                        f"each new token: {arg('tasks')} scores log-likelihood tasks (multiple choice, loglikelihood, "
                        "rolling perplexity) only")
    return manager, loaded


def score_tasks(src: str | os.PathLike, tasks: str | list[str], *, include_path: str | os.PathLike | None = None,
                num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                device: str = "auto", dtype: str = "auto", tokenizer: str | os.PathLike | None = None,
                reference: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
                overwrite: bool = False, progress: bool = True, revision: str | None = None,
                reference_revision: str | None = None, hidden_placement: str | None = None,
                echo: Callable[[str], None] = print) -> TaskReport:
    """Score checkpoint `src` on lm-eval tasks (names, or one string of names separated by commas), out of core;
    with `reference`, score it too and give each metric's difference with its paired standard error. `limit`:
    the first items of each task (a share of them below 1). `json_path`: also write lm-eval's results dict there,
    with the table (replacing only an earlier such file, with `overwrite`). `hidden_placement`: device, host or
    disk, where the hidden states wait between layers (default: the first they fit in). `echo` receives the
    estimate printed before each streamed pass."""
    started = time.perf_counter()
    joined = ",".join(tasks) if isinstance(tasks, list | tuple) else str(tasks)
    json_path = check_task_arguments(src, tasks=joined, include_path=include_path, num_fewshot=num_fewshot,
                                     limit=limit, text=None, dataset=None, calib=None, tokenizer=tokenizer,
                                     batch_size=batch_size, reference=reference, device=device, dtype=dtype,
                                     json_path=json_path, overwrite=overwrite, revision=revision,
                                     reference_revision=reference_revision)
    names = task_names(joined)
    model_args = {"tokenizer": tokenizer, "hidden_placement": hidden_placement}
    _quiet_lm_eval(progress)
    import lm_eval

    from .lm_eval_model import StreamedLM

    manager, loaded = load_tasks(names, include_path)
    models = [(src, revision, "this checkpoint")]
    if reference is not None:
        models.append((reference, reference_revision, "the reference"))
    lms = []
    for path, rev, what in models:  # both opened (and checked) before either is scored
        try:
            lms.append(StreamedLM(pretrained=path, revision=rev, device=device, dtype=dtype, batch_size=batch_size,
                                  progress=progress, **(model_args or {})))
        except DernError as e:
            raise DernError(f"{arg('reference')}: {e}" if what == "the reference" else str(e)) from None
    outputs = []
    for lm, (_, _, what) in zip(lms, models, strict=True):
        lm.on_plan = lambda plan, what=what: echo(f"{what}: {plan}")
        outputs.append(lm_eval.simple_evaluate(model=lm, tasks=manager.match_tasks(names), task_manager=manager,
                                               num_fewshot=num_fewshot, limit=limit,
                                               log_samples=reference is not None))
    rows = score_rows(outputs[0], outputs[1] if reference is not None else None)
    report = TaskReport(checkpoint=lms[0].checkpoint, tasks=sorted(loaded["tasks"]), rows=rows,
                        results=_plain(outputs[0]),
                        reference=lms[1].checkpoint if reference is not None else None,
                        reference_results=_plain(outputs[1]) if reference is not None else None)
    if limit is not None:
        report.notes.append(f"(--limit {limit}: the first items of each task only; the scores are not the task's)")
    report.seconds = time.perf_counter() - started
    if json_path is not None:
        check_replaceable(json_path, JSON_FILE, overwrite, not_json_of(TASK_EVAL_FORMAT, "dern-stream eval --tasks"),
                          directory=False)
        write_replacing(json_path, (json.dumps(report.to_json(), indent=2, default=str) + "\n").encode())
    return report


def _plain(output: dict) -> dict:
    """lm-eval's results dict without the per-item samples, as plain JSON (lm-eval's own writer does the same)."""
    return json.loads(json.dumps({k: v for k, v in output.items() if k != "samples"}, default=str))


def _quiet_lm_eval(progress: bool) -> None:
    """lm-eval logs every step at INFO and warns about defaults it fills in; keep its warnings only, and
    nothing below errors with --quiet."""
    level = logging.WARNING if progress else logging.ERROR
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(level)
