"""A RewritePlan for people (`describe`) and for programs (`plan_record`, the `plan --json` file)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..checkpoint.output_dir import check_staging_path, resumable, staging_path
from ..checkpoint.progress import Progress
from ..runtime.arguments import format_size
from .summary_lines import describe_setting

if TYPE_CHECKING:  # no torch here: api.plan checks its --json target before it loads the plan's modules
    from .plan import RewritePlan

PLAN_FORMAT = "dern-stream-plan"  # the --json file's format marker

# A stated rate, not a measurement of the machine the plan runs on: float32 matrix products on this
# project's 2-core development machine (docs/performance.md, "Compute").
CPU_GFLOPS = 140.0


def plan_record(plan: RewritePlan) -> dict:
    """Everything the plan decided, as plain JSON: per layer the kept and dropped experts and their
    scores, the tensors copied untouched, every output shard with each tensor's byte range [start, end)
    in the file, the output config, notes, run key and estimates."""
    est = plan.estimates
    sizes = {spec.name: spec.nbytes for spec in plan.specs}
    return {
        "format": PLAN_FORMAT,
        "dern_stream_version": __version__,
        "source": str(plan.source),
        "calibration": str(plan.calib) if plan.calib is not None else None,
        "model_type": plan.family.model_type,
        "num_experts": plan.shape.num_experts,
        "hidden_size": plan.shape.hidden,
        "intermediate_size": plan.shape.intermediate,
        "options": plan.options.method_record(),
        "layers": {str(i): {
            "kept": s.kept, "dropped": _dropped(plan, s.kept), "ranking": s.source, "calibration_tokens": s.tokens,
            "importance": s.scores.tolist() if s.scores is not None else None,
        } for i, s in plan.selection.items()},
        "copied": [name for names in plan.copy_with.values() for name in names],
        "shards": [{"file": s.file, "size": s.size, "header_bytes": len(s.header),
                    "tensors": {name: [offset, offset + sizes[name]] for name, offset in s.offsets.items()}}
                   for s in plan.shards],
        "output_bytes": plan.output_bytes,
        "side_file_bytes": plan.side_bytes,
        "config": plan.out_config,
        "notes": plan.notes,
        "run_key": plan.run,
        "estimates": {
            "host_peak_bytes": est.host_peak, "device_peak_bytes": est.device_peak,
            "gflop_per_layer": {"importance": est.per_layer.importance, "reassign": est.per_layer.reassign,
                                "cluster": est.per_layer.cluster, "fit": est.per_layer.fit},
        },
    }


def _dropped(plan: RewritePlan, kept: list[int] | None) -> list[int] | None:
    if kept is None:
        return None
    keep = set(kept)
    return [e for e in range(plan.shape.num_experts) if e not in keep]


def describe(plan: RewritePlan) -> str:
    """A few lines: what changes, the output and the disk it needs, memory, compute."""
    from .layer_report import ROUTER_NORM

    shape, options, est = plan.shape, plan.options, plan.estimates
    changed = [i for i, s in plan.selection.items() if s.kept is None or len(s.kept) < shape.num_experts]
    lines = [f"plan: {plan.source} ({plan.family.model_type}, {len(plan.layers)} MoE layers of {shape.num_experts} "
             f"experts x {shape.intermediate} neurons) -> {options.experts} experts per layer"
             + (f" of {options.intermediate_size} neurons" if options.intermediate_size else "")
             + f", by {describe_setting(options)}"]
    if not changed and not options.intermediate_size:
        lines.append("  no layer changes: every expert is kept (the output is the input's tensors, copied)")
    else:
        lines.append(f"  layers that change: {len(changed)} of {len(plan.layers)}")
        for i in changed[:8]:
            s = plan.selection[i]
            how = "by router norm" if s.source == ROUTER_NORM else f"by routing over {s.tokens} cached tokens"
            what = (f"drops {_show(_dropped(plan, s.kept))}" if s.kept is not None
                    else "chooses its experts from the layer's outputs when it runs")
            lines.append(f"    layer {i}: {what} (ranked {how})")
        if len(changed) > 8:
            lines.append(f"    ... and {len(changed) - 8} more (--json FILE lists every layer)")
    need = plan.output_bytes + plan.side_bytes
    lines.append(f"  output: {format_size(plan.output_bytes)} of tensors in {len(plan.shards)} shard(s), "
                 f"{format_size(plan.side_bytes)} of side files; free disk needed: {format_size(need)}"
                 + _free_here(plan.out))
    lines.append(f"  peak host memory (estimated): {format_size(est.host_peak)}"
                 + (f"; device memory: {format_size(est.device_peak)} on {plan.device}" if est.device_peak is not None
                    else f" (computing on {plan.device})"))
    per = est.per_layer
    seconds = per.total / CPU_GFLOPS
    lines.append(f"  compute per MoE layer (upper bound): {per.total:.1f} GFLOP (importance {per.importance:.1f}, "
                 f"reassign {per.reassign:.1f}, cluster {per.cluster:.1f}, fit {per.fit:.1f}); about "
                 f"{seconds:.1f} s per layer, {seconds * len(plan.layers) / 60:.1f} min in all, at "
                 f"{CPU_GFLOPS:.0f} GFLOP/s")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _show(items: list[int]) -> str:
    return str(items) if len(items) <= 12 else f"{len(items)} experts: {items[:12]}..."


def _free_here(out: Path | None) -> str:
    free = free_space(out) if out is not None else None
    return f" ({format_size(free)} free there)" if free is not None else ""


def free_space(out: Path) -> int | None:
    """Bytes free on the disk OUT will be written to (that of its nearest existing folder)."""
    where = next((p for p in (out, *out.parents) if p.exists()), None)
    return shutil.disk_usage(where).free if where is not None else None


def run_notes(plan: RewritePlan, restart: bool, workers: int, ray: str | None) -> list[str]:
    """What the plan says of the run itself: the partial output in OUT's staging folder that the rewrite would
    resume or discard (refused, as the rewrite refuses it, where it may not use it), the room on OUT's disk, and
    the memory of several workers."""
    notes, est = [], plan.estimates
    if plan.out is not None:
        staging, present = staging_path(plan.out), 0
        check_staging_path(staging)
        previous = resumable(staging, plan.run, restart)
        if previous is not None:
            present = sum(p.stat().st_blocks * 512 for p in staging.iterdir() if p.is_file() and not p.is_symlink())
            notes.append(f"{staging} holds an interrupted run of this rewrite with {len(previous.layers)} of "
                         f"{len(plan.layers)} layers done: the rewrite would resume from them")
        elif restart and Progress.read(staging) is not None:
            notes.append(f"--restart: the interrupted run in {staging} would be discarded")
        need, free = plan.output_bytes + plan.side_bytes - present, free_space(plan.out)
        if free is not None and need > free:
            notes.append(f"the disk OUT is on has {format_size(free)} free, less than the {format_size(need)} the "
                         "output needs: the rewrite would refuse to start")
    per_run = f"{format_size(est.host_peak)} of host memory" + (
        f" and {format_size(est.device_peak)} on its device" if est.device_peak is not None else "")
    if workers > 1:
        notes.append(f"{workers} worker processes, each holding one layer as one process does ({per_run}): about "
                     f"{format_size(workers * est.host_peak)} of host memory in all")
    if ray is not None:
        notes.append(f"one task per layer on the Ray cluster at {ray}, each holding one layer ({per_run})")
    return notes
