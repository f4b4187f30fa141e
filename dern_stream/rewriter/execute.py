"""The executor: a RewritePlan written into a staged OUT, layer by layer, by one process or by workers."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    Checkpoint,
    NonFiniteTensor,
    ShardedWriter,
    StagedOutput,
    check_free_space,
    copy_side_files,
    write_durably,
)
from ..checkpoint.integrity import CHECKSUM, checksum
from ..checkpoint.source import INDEX_NAME
from ..errors import DernError, describe
from ..layout.parameter_count import rewrite_parameters
from ..publish.card import BASE_CARD_NOTE, CARD_NAME, write_card
from ..publish.report import ReportSummary
from ..runtime.arguments import format_size
from ..runtime.host_memory import return_freed_memory
from ..runtime.stage_clock import StageClock
from .audit import audit_record, write_audit
from .checks import check_runs_in_one_process
from .executors import run_local, run_ray
from .layer_io import LayerInputs, read_layer
from .layer_report import LayerReport
from .layer_task import compute_layer, write_outputs
from .pipeline import run_pipeline
from .plan import RewritePlan
from .sequential import SequentialForward, remove_sequential_files, sequential_journaled
from .summary_lines import describe_setting, mean_output_error

log = logging.getLogger("dern_stream")


@dataclass
class RewriteSummary:
    output: Path
    model_type: str
    layers: int
    experts_in: int
    experts_out: int
    segments_pooled: int
    segments_reassigned: int
    output_bytes: int
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # busy seconds per stage; they overlap
    setting: str = ""  # the method and its recipe, as said in the summary
    # The mean over layers of the relative output error on the cached inputs, and before the refits (None: none ran)
    output_error: tuple[float, float | None] | None = None
    report: ReportSummary | None = None  # `report=`: the report written after the rewrite
    pushed: str | None = None  # the Hub commit's URL, after rewrite(push_to_hub=...)

    def __str__(self) -> str:
        frac = self.segments_reassigned / self.segments_pooled if self.segments_pooled else 0.0
        lines = [
            f"done: {self.layers} MoE layers of {self.model_type}, experts {self.experts_in} -> {self.experts_out}"
            + (f" by {self.setting}" if self.setting else ""),
            f"segments reassigned: {self.segments_reassigned} of {self.segments_pooled} pooled ({frac:.1%})",
            f"output: {self.output} ({format_size(self.output_bytes)} of tensors) in {self.seconds:.1f} s "
            f"on {self.device}",
        ]
        if self.output_error is not None:
            error, unfitted = self.output_error
            lines.append(f"relative output error on the cached inputs, mean over the layers: {error:.3f}"
                         + (f" ({unfitted:.3f} before the refits)" if unfitted is not None else ""))
        if self.stages:
            lines.append("busy time by stage (stages overlap): "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items()))
        if self.report is not None:
            lines.append(str(self.report))
        if self.pushed:
            lines.append(f"verified and pushed: {self.pushed}")
        return "\n".join(lines)


def execute(plan: RewritePlan, *, overwrite: bool = False, restart: bool = False, progress: bool = True,
            started: float | None = None, workers: int = 1, ray_address: str | None = None) -> RewriteSummary:
    """Write the plan's output into `plan.out`, through a staged directory that an interrupted run leaves
    behind for the same call to resume from (byte-identical to an uninterrupted run).

    One process by default: three threads over the layers (pipeline.py). `workers` > 1: that many local
    worker processes, a layer each at a time; `ray_address`: one Ray task per layer on that cluster
    (layer_pools.py). The output is the same bytes whichever runs it."""
    started = time.perf_counter() if started is None else started
    check_runs_in_one_process(plan.options, workers, ray_address)
    before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)  # one process computes with the plan's threads too (workers: executors.py)
    try:
        with plan.open_source() as ckpt:
            return _execute(plan, ckpt, overwrite, restart, progress, started, workers, ray_address)
    finally:
        torch.set_num_threads(before)


def _execute(plan: RewritePlan, ckpt: Checkpoint, overwrite: bool, restart: bool, progress: bool, started: float,
             workers: int, ray_address: str | None) -> RewriteSummary:
    clock = StageClock(plan.device)
    clock.add({"importance": plan.ranking_seconds})
    stage = StagedOutput(plan.out, plan.run, restart, overwrite)
    notes = list(plan.notes)
    try:
        with stage:
            records = stage.progress.layers  # per-layer audit entries (plain numbers), resumed ones first
            if records:
                log.info("resuming %s: %d of %d MoE layers already done", stage.path, len(records), len(plan.layers))
            check_free_space(stage.path, plan.output_bytes + plan.side_bytes)
            with ShardedWriter(stage.path, plan.specs, plan.options.max_shard_size, resume=stage.resumed) as writer:
                _write_layers(_Steps(plan, ckpt, stage, writer, clock), progress, workers, ray_address)
            _finish(plan, ckpt, stage.path, writer, records, notes, plan.device)
    except NonFiniteTensor:
        # Resuming would meet the same values: the input must change first (and a changed input
        # starts over), so the finished layers are of no use.
        shutil.rmtree(stage.path, ignore_errors=True)
        raise
    except (DernError, OSError) as e:
        if stage.path.exists():  # finished layers were kept
            raise DernError(f"{describe(e)} ({len(stage.progress.layers)} of {len(plan.layers)} MoE layers are done "
                            f"and kept in {stage.path}: run the same command again to resume)") from e
        raise
    shape = plan.shape
    return RewriteSummary(
        output=plan.out, model_type=plan.family.model_type, layers=len(records),
        experts_in=shape.num_experts, experts_out=plan.options.experts,
        segments_pooled=len(plan.layers) * (shape.num_experts - plan.options.experts) * shape.intermediate,
        segments_reassigned=sum(r["segments_reassigned"] for r in records.values()),
        output_bytes=writer.total_size, seconds=time.perf_counter() - started, device=str(plan.device), notes=notes,
        stages=dict(clock.seconds), setting=describe_setting(plan.options), output_error=mean_output_error(records),
    )


@dataclass
class _Steps:
    """What each layer goes through in the driver: read (into the page cache), and written and journaled."""

    plan: RewritePlan
    ckpt: Checkpoint
    stage: StagedOutput
    writer: ShardedWriter
    clock: StageClock
    bar: tqdm | None = None

    def read(self, layer) -> LayerInputs:
        inputs = read_layer(self.ckpt, self.plan.family, layer, self.plan.shape, self.plan.reads_experts, self.clock)
        with self.clock("read"):
            self.ckpt.prefetch(self.plan.read_ahead(layer))
        return inputs

    def compute(self, inputs: LayerInputs, forward: SequentialForward | None = None) -> LayerReport:
        return compute_layer(self.plan, inputs, self.clock, forward)

    def write(self, report: LayerReport) -> None:
        with self.clock("write"):
            record = write_outputs(self.plan, self.writer, self.ckpt, report)
            # Journaled once flushed: a resumed run trusts exactly what is on disk.
            self.writer.commit(lambda: self.stage.progress.add(report.index, record))
            if self.plan.options.sequential:
                sequential_journaled(self.stage.path, report.index)
        return_freed_memory()  # freed layer buffers go back to the OS, not into heap fragments
        self.done(report.index, record)

    def written_elsewhere(self, index: int, record: dict, seconds: dict[str, float]) -> None:
        """A layer a worker wrote and flushed: journaled here."""
        self.stage.progress.add(index, record)
        for name in self.plan.writes[index]:
            self.writer.skip(name)
        self.clock.add(seconds)
        self.done(index, record)

    def done(self, index: int, record: dict) -> None:
        self.bar.update()
        self.bar.set_postfix(layer=index, reassigned=record["segments_reassigned"])


def _write_layers(steps: _Steps, progress: bool, workers: int, ray_address: str | None) -> None:
    """Every layer not yet journaled, by the executor the options choose; then the shards finished."""
    plan, records = steps.plan, steps.stage.progress.layers
    for index in records:
        for name in plan.writes[int(index)]:
            steps.writer.skip(name)
    todo = [layer for layer in plan.layers if str(layer.index) not in records]
    with tqdm(total=len(plan.layers), initial=len(plan.layers) - len(todo), desc="rewrite MoE layers",
              unit="layer", disable=not progress) as steps.bar:
        if plan.options.sequential and todo:
            _run_sequential(steps, todo)
        elif workers == 1 and ray_address is None:
            run_pipeline(todo, steps.read, steps.compute, steps.write)
        else:
            indices = [layer.index for layer in todo]
            runs = (run_ray(plan, steps.stage.path, indices, ray_address) if ray_address is not None
                    else run_local(plan, steps.stage.path, indices, workers))
            # closing: a failure here stops the workers now, not when the generator is collected
            with closing(runs) as finished:
                for index, record, seconds in finished:
                    steps.written_elsewhere(index, record, seconds)  # the worker flushed the layer's bytes already
    if plan.options.sequential:
        remove_sequential_files(steps.stage.path)
    with steps.clock("write"):
        steps.writer.finish()


def _run_sequential(steps: _Steps, todo: list) -> None:
    """The layers in order, each fitted on the compressed model's own inputs (sequential.py)."""
    plan = steps.plan
    with steps.clock("forward"):
        forward = SequentialForward(plan.source, plan.dump, plan.options.fit_tokens, plan.options.sequential_target,
                                    plan.device, steps.stage.path, [int(i) for i in steps.stage.progress.layers])
    try:
        run_pipeline(todo, steps.read, lambda inputs: steps.compute(inputs, forward), steps.write)
    finally:
        forward.close()


def _finish(plan: RewritePlan, ckpt: Checkpoint, path: Path, writer: ShardedWriter, records: dict, notes: list[str],
            compute) -> None:
    """Side files, the model card, the audit record, then config.json: the last file, so a directory
    without it never looks like a loadable checkpoint."""
    copied_files, skipped = copy_side_files(plan.source, path)
    if skipped:
        notes.append(f"not copied (weights in other formats or folders): {', '.join(skipped)}")
        log.warning("note: %s", notes[-1])
    if CARD_NAME in copied_files:
        notes.append(BASE_CARD_NOTE)
        log.warning("note: %s", notes[-1])
    config_bytes = (json.dumps(plan.out_config, indent=2) + "\n").encode()
    written = [*copied_files, *([INDEX_NAME] if len(writer.files) > 1 else [])]
    files = {name: checksum((path / name).read_bytes()) for name in written}
    files["config.json"] = checksum(config_bytes)
    records = {k: records[k] for k in sorted(records, key=int)}
    dump = plan.dump
    record = audit_record(
        source=plan.origin, fingerprint=plan.fingerprint, calib=plan.calib.resolve() if dump is not None else None,
        model_type=plan.family.model_type, num_experts=plan.shape.num_experts, intermediate=plan.shape.intermediate,
        options=plan.options, config_notes=notes, layers=records, run=plan.run, device=compute,
        calib_provenance=dump.attrs.get("provenance") if dump is not None else None,
        checksums={"algorithm": CHECKSUM, "headers": writer.header_checksums, "files": dict(sorted(files.items()))},
        parameters=rewrite_parameters(plan, ckpt.entries),
    )
    write_card(path, record, plan.out_config)  # README.md: the model card, keeping the input's README.md in it
    write_audit(path, record)
    write_durably(path / "config.json", config_bytes)
