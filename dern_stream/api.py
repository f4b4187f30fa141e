"""The rewrite: options checked, a plan made (rewrite_plan.py: every check, nothing written), then executed
(execute.py)."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .checkpoint.hub_cache import source_record
from .checkpoint.locate import resolve_checkpoint
from .checkpoint.output_dir import check_output_location
from .errors import DernError, arg
from .families import family_for
from .options import RewriteOptions, option_fields
from .publish.hub import check_push_access, check_push_target, check_push_token, check_repo_id, push
from .publish.report import check_report_target, write_report
from .rewriter.checks import (
    check_calib_choice,
    check_model,
    check_runs_in_one_process,
    default_for_family,
    output_config,
)
from .rewriter.plan_record import PLAN_FORMAT, plan_record, run_notes
from .runtime.arguments import whole
from .runtime.durable_files import write_replacing
from .runtime.host_memory import map_large_blocks
from .runtime.locks import reading_dump
from .runtime.optional_packages import check_transformers, require_matplotlib, require_ray
from .runtime.own_outputs import not_json_of
from .runtime.targets import JSON_FILE, check_apart, check_json_target, check_replaceable, read_paths

if TYPE_CHECKING:
    from .rewriter.execute import RewriteSummary
    from .rewriter.plan import RewritePlan

log = logging.getLogger("dern_stream")


def rewrite(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experts: int,
    calib: str | os.PathLike | None = None,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
    workers: int = 1,
    ray: str | None = None,
    revision: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    report: str | os.PathLike | None = None,
    **options,
) -> RewriteSummary:
    """Rewrite the MoE checkpoint `src` (directory or Hub repo id) into `out` with `experts` experts per
    MoE layer, built by DERN (or by `method`). DERN without a recipe runs the default setting, the paper's method
    with the down refit; `recipe="paper"` runs it as the paper gives it, `recipe="best"` the most accurate and
    slowest setting (docs/method.md, "Recipes"). `options` are RewriteOptions' fields (options.py, docs/cli.md),
    each documented there; left out or None, they take the recipe's value, else the field's default. Raises
    DernError, with a one-line message, for any bad input; `out` is then left as it was.

    An interrupted run (killed, disk full, Ctrl-C) leaves its finished layers in `.OUT.dern-partial`
    beside `out`; the same call resumes from them, and the result is byte-identical to an
    uninterrupted run. `restart=True` discards them instead.

    `workers=N` runs the layers in N local worker processes; `ray="ADDRESS"` runs them as tasks on that
    Ray cluster (`pip install 'dern-stream[ray]'`; every node must see the same paths). The output is
    byte-identical to a single-process run.

    `revision`: the branch, tag or commit of `src` when it is a Hub repo id (default: main). With
    `push_to_hub="me/name"` the finished output is checked (`verify(out, against=src)`) and, if whole,
    uploaded to that Hub repo (created if needed, `private` if so asked); if verify finds a problem,
    nothing is uploaded and a DernError says what. The summary's `pushed` is the commit's URL.

    `report="DIR"` writes the report of the finished output into DIR (publish/report.py; needs matplotlib:
    `pip install 'dern-stream[report]'`); DIR is checked before any work.

    Sets glibc's mmap threshold to 4 MiB for the process (host_memory.map_large_blocks)."""
    started = time.perf_counter()
    map_large_blocks()
    chosen = _options(experts, options)
    _check_run(chosen, workers, ray, push_to_hub, private)
    source, out_path, calib, reads, report = _check_paths(src, out, calib, report, chosen, revision, overwrite)
    chosen = _check_model(source, chosen)
    # The plan, the executor and what they import (torch, zarr) load only now: a command refused by the
    # checks above, which need no tensors, answers at once.
    from .rewriter.execute import execute
    from .rewriter.plan import make_plan
    from .runtime.device import deterministic_kernels

    with _reading(calib), deterministic_kernels(chosen.device):
        made = make_plan(source, out_path, chosen, calib, progress, source_record(source, revision), workers)
        _before_execution(made, push_to_hub)
        summary = execute(made, overwrite=overwrite, restart=restart, progress=progress, started=started,
                          workers=workers, ray_address=ray)
    _publish(summary, out_path, report, overwrite, reads, push_to_hub, private, source, progress)
    return summary


def _before_execution(made: RewritePlan, push_to_hub: str | None) -> None:
    """The plan's notes said, and what the plan lets be checked before any layer is written: the push's target."""
    for note in made.notes:
        log.warning("note: %s", note)
    if push_to_hub is not None:  # the output's file names are known now
        check_push_target(push_to_hub, made.output_files(), what=made.out.name)


def _check_paths(src, out, calib, report, options: RewriteOptions, revision: str | None, overwrite: bool
                 ) -> tuple[Path, Path, Path | None, dict, Path | None]:
    """IN (fetched if a Hub repo id), OUT, the dump and the report directory, resolved and checked: OUT and the
    report directory apart from what the rewrite reads, and free or the tool's own earlier output."""
    source = resolve_checkpoint(src, revision)
    out_path = Path(out).expanduser().resolve()
    calib = Path(calib).expanduser().resolve() if calib is not None else None  # workers may run elsewhere
    reads = {**read_paths("the input checkpoint", source), "the calibration dump": calib}
    check_output_location(out_path, overwrite, reads)
    check_calib_choice(options, calib)
    if report is not None:
        report = _report_target(report, out_path, overwrite, reads, source)
    return source, out_path, calib, reads, report


def _check_model(source: Path, options: RewriteOptions) -> RewriteOptions:
    """The model (its config.json and its shards' headers) against the options, before torch loads: a bad K, a
    width it cannot take, a config that cannot route are refused at once (the plan checks them again). Returns the
    options as they apply to this model (the default setting without what the model cannot take)."""
    with Checkpoint(source) as ckpt:
        options = default_for_family(options, family_for(ckpt.config))
        family = check_model(ckpt, source, options)[0]
        output_config(ckpt, family, options)
    return options


def _check_run(options: RewriteOptions, workers: int, ray: str | None, push_to_hub: str | None,
               private: bool) -> None:
    """How the rewrite is to run and what follows it, checked before anything else."""
    whole("workers", workers)
    if ray is not None:
        if workers != 1:
            raise DernError(f"{arg('workers')} and {arg('ray')} do not go together: Ray decides where the layers run")
        if not isinstance(ray, str) or not ray:
            raise DernError(f"{arg('ray')} must be a cluster address such as auto or ray://host:10001, got {ray!r}")
        require_ray()
    check_runs_in_one_process(options, workers, ray)
    if options.sequential:
        check_transformers(f"{arg('sequential', True)} runs the model's forward and needs")
    if push_to_hub is not None:
        check_repo_id(push_to_hub, "--push-to-hub")
        check_push_token(push_to_hub)
        check_push_access(push_to_hub)
    elif private:
        raise DernError(f"{arg('private', True)} goes with {arg('push_to_hub')} (it makes the repo pushed to private)")


def _publish(summary: RewriteSummary, out: Path, report: Path | None, overwrite: bool, reads: dict,
             push_to_hub: str | None, private: bool, source: Path, progress: bool) -> None:
    """The report and the Hub push of the finished output; a failure says that the rewrite itself is complete."""
    try:
        if report is not None:
            summary.report = write_report(out, report, overwrite=overwrite, reads=reads)
        if push_to_hub is not None:
            summary.pushed = push(out, push_to_hub, private=private, against=source, progress=progress)
    except DernError as e:
        raise DernError(f"{e} (the rewrite itself is complete in {out})") from e
    except KeyboardInterrupt:
        raise DernError(f"interrupted after the rewrite was complete in {out}; "
                        + ("the report was not written" if summary.report is None and report is not None
                           else "nothing was pushed")) from None


def _report_target(report: str | os.PathLike, out: Path, overwrite: bool, reads: dict, source: Path) -> Path:
    """Check `report=` before the rewrite: matplotlib present, a directory the report may take (inside OUT is
    fine: OUT is written first)."""
    require_matplotlib()
    target = Path(report).expanduser().resolve()
    if out in target.parents:  # written once OUT is complete: it must be a folder of its own directly in OUT
        check_apart(target, "report directory", reads)
        if target.parent != out or "." in target.name or (source / target.name).exists():
            raise DernError(f"report directory {target}: inside OUT, give a new folder directly in it, such as "
                            f"{out / 'report'}")
        return target
    check_apart(target, "report directory", {"the output directory": out})
    return check_report_target(target, overwrite, reads)


def plan(
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    experts: int,
    calib: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
    workers: int = 1,
    ray: str | None = None,
    revision: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    report: str | os.PathLike | None = None,
    **options,
) -> RewritePlan:
    """What `rewrite(src, out, experts=..., calib=..., **options)` would do, decided without writing anything or
    reading any expert weight; it takes every argument rewrite takes and checks them as rewrite would. Without
    `calib` (and unless `importance` is given) the experts are ranked by router norm, as `importance="router-norm"`
    does. With `out`, its location is checked, and the notes say whether a partial output there would be resumed
    and whether its disk has room for the output. With `json_path` the plan is also written there as JSON
    (replacing only an earlier plan, with `overwrite`). `revision`: as for rewrite."""
    if calib is None and options.get("importance") is None:
        options = {**options, "importance": "router-norm"}
    chosen = _options(experts, options)
    _check_run(chosen, workers, ray, push_to_hub, private)
    if out is not None:
        source, out, calib, reads, report = _check_paths(src, out, calib, report, chosen, revision, overwrite)
        chosen = _check_model(source, chosen)
    else:
        source = resolve_checkpoint(src, revision)
        calib = Path(calib).expanduser().resolve() if calib is not None else None  # workers may run elsewhere
        reads = {**read_paths("the input checkpoint", source), "the calibration dump": calib}
    if json_path is not None:
        json_path = check_json_target(json_path, overwrite, PLAN_FORMAT, "dern-stream plan", reads)
    if out is None:
        check_calib_choice(chosen, calib)
        if report is not None:  # where OUT is not given, what can be told of the report's folder
            require_matplotlib()
            check_report_target(Path(report).expanduser().resolve(), overwrite, reads)
        chosen = _check_model(source, chosen)
    from .rewriter.plan import make_plan  # (loads torch: after the checks above)
    from .runtime.device import deterministic_kernels

    with _reading(calib), deterministic_kernels(chosen.device):
        made = make_plan(source, out, chosen, calib, progress, source_record(source, revision), workers)
    made.notes += run_notes(made, restart, workers, ray)
    if json_path is not None:
        check_replaceable(json_path, JSON_FILE, overwrite, not_json_of(PLAN_FORMAT, "dern-stream plan"),
                          directory=False)
        write_replacing(json_path, (json.dumps(plan_record(made), indent=2) + "\n").encode())
    return made


def _reading(calib: Path | None):
    """The dump's shared lock, held while it is read (no `dump --overwrite` under it); nothing without one."""
    return reading_dump(calib) if calib is not None and calib.is_dir() else nullcontext()


def _options(experts: int, given: dict) -> RewriteOptions:
    """RewriteOptions from keyword arguments; an unknown one is a one-line error."""
    known = {f.name for f in option_fields()}
    unknown = sorted(set(given) - known)
    if unknown:
        raise DernError(f"unknown rewrite option {unknown[0]!r}; the options are: {', '.join(sorted(known))}")
    recipe = given.get("recipe")
    return RewriteOptions.build(experts, recipe, **{k: v for k, v in given.items() if k != "recipe"})
