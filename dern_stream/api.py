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

from .checkpoint.locate import resolve_checkpoint
from .checkpoint.output_dir import check_output_location
from .durable_files import write_replacing
from .errors import DernError, arg
from .host_memory import map_large_blocks
from .locks import reading_dump
from .optional import require_ray
from .options import RewriteOptions, option_fields, whole
from .plan_report import PLAN_FORMAT, plan_record
from .targets import JSON_FILE, check_json_target, check_replaceable, not_json_of, read_paths

if TYPE_CHECKING:
    from .execute import RewriteSummary
    from .rewrite_plan import RewritePlan

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
    **options,
) -> RewriteSummary:
    """Rewrite the MoE checkpoint `src` (directory or Hub repo id) into `out` with `experts` experts per
    MoE layer, built by DERN (or by `method`; `recipe="best"` is the recommended setting, see the
    README). `options` are RewriteOptions' fields (method, recipe, alpha, sim_components, kmeans_iters,
    intermediate_size, importance, router_transfer, kmeans_init, alpha_candidates, refit, refit_ridge,
    fit_tokens, output_dtype, device, max_shard_size), each documented there; left out or None, they
    take the recipe's value, else the paper's default. Raises DernError, with a one-line message, for any
    bad input; `out` is then left as it was.

    An interrupted run (killed, disk full, Ctrl-C) leaves its finished layers in `.OUT.dern-partial`
    beside `out`; the same call resumes from them, and the result is byte-identical to an
    uninterrupted run. `restart=True` discards them instead.

    `workers=N` runs the layers in N local worker processes; `ray="ADDRESS"` runs them as tasks on that
    Ray cluster (`pip install 'dern-stream[ray]'`; every node must see the same paths). The output is
    byte-identical to a single-process run.

    Sets glibc's mmap threshold to 4 MiB for the process (host_memory.map_large_blocks)."""
    started = time.perf_counter()
    map_large_blocks()
    chosen = _options(experts, options)
    whole("workers", workers)
    if ray is not None:
        if workers != 1:
            raise DernError(f"{arg('workers')} and {arg('ray')} do not go together: Ray decides where the layers run")
        if not isinstance(ray, str) or not ray:
            raise DernError(f"{arg('ray')} must be a cluster address such as auto or ray://host:10001, got {ray!r}")
        require_ray()
    source = resolve_checkpoint(src)
    out_path = Path(out).expanduser().resolve()
    calib = Path(calib).expanduser().resolve() if calib is not None else None  # workers may run elsewhere
    check_output_location(out_path, overwrite, {**read_paths("the input checkpoint", source),
                                                "the calibration dump": calib})
    # The plan, the executor and what they import (torch, zarr) load only now: a command refused by the
    # checks above, which need no tensors, answers at once.
    from .execute import execute
    from .rewrite_plan import make_plan

    with _reading(calib):
        made = make_plan(source, out_path, chosen, calib, progress)
        for note in made.notes:
            log.warning("note: %s", note)
        return execute(made, overwrite=overwrite, restart=restart, progress=progress, started=started,
                       workers=workers, ray_address=ray)


def plan(
    src: str | os.PathLike,
    *,
    experts: int,
    calib: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> RewritePlan:
    """What `rewrite(src, OUT, experts=..., calib=..., **options)` would do, decided without writing
    anything or reading any expert weight. Without `calib` (and unless `importance` is given) the experts
    are ranked by router norm, as `importance="router-norm"` does. With `json_path` the plan is also
    written there as JSON (replacing only an earlier plan, with `overwrite`)."""
    if calib is None and options.get("importance") is None:
        options = {**options, "importance": "router-norm"}
    chosen = _options(experts, options)
    source = resolve_checkpoint(src)
    calib = Path(calib).expanduser().resolve() if calib is not None else None  # workers may run elsewhere
    if json_path is not None:
        json_path = check_json_target(json_path, overwrite, PLAN_FORMAT, "dern-stream plan",
                                      {**read_paths("the input checkpoint", source), "the calibration dump": calib})
    from .rewrite_plan import make_plan  # (loads torch: after the checks above)

    with _reading(calib):
        made = make_plan(source, None, chosen, calib, progress)
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
