"""One MoE layer of a plan: `compute_layer` and `write_outputs`, which every executor uses, and
`run_layer`, the layer start to finish in whatever process runs it (a local worker or a Ray task).

For `run_layer` the driver has laid out the output shards already (headers written, sizes reserved); the task reads
its layer, computes it, writes its tensors at the plan's offsets, and flushes them before it returns
the layer's record. The driver journals the record: a layer counts as done only then.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint import Checkpoint, ShardedWriter
from ..fit.rows import dump_rows
from ..runtime.device import deterministic_kernels
from ..runtime.host_memory import return_freed_memory
from ..runtime.stage_clock import StageClock
from .audit import layer_record
from .layer import compress_layer
from .layer_io import LayerInputs, copy_tensor, read_layer, write_layer
from .layer_report import LayerReport
from .plan import RewritePlan

if TYPE_CHECKING:
    from .sequential import SequentialForward


def run_pickled(plan: bytes, staged: Path, index: int, threads: int) -> tuple[dict, dict[str, float]]:
    """run_layer for a plan pickled by the driver. A local pool sends it as plain bytes: torch would pass
    the plan's tensors to the workers as shared file descriptors, whose serving thread in the driver
    prints a traceback when a worker is stopped mid-transfer."""
    return run_layer(_unpickled(plan), staged, index, threads)


@functools.lru_cache(maxsize=1)
def _unpickled(plan: bytes) -> RewritePlan:
    return pickle.loads(plan)  # once per worker process: every layer it runs shares the plan


def run_layer(plan: RewritePlan, staged: Path, index: int, threads: int | None = None) -> tuple[dict, dict[str, float]]:
    """Rewrite MoE layer `index` of `plan` into the shards in `staged`, computing with `threads` torch threads
    (default: as many as the driver; Ray gives a task 1 by default). Returns its journal record (with the checksums
    of what it wrote) and its busy seconds per stage. The bytes do not depend on the thread count
    (tests/rewriter/test_executors.py checks it), so local workers share the cores out."""
    torch.set_num_threads(threads or plan.threads)
    clock = StageClock(plan.device)
    # Leaving the block flushes every shard written to disk before the record leaves (or raises the error).
    with deterministic_kernels(plan.device), plan.open_source() as ckpt, \
            ShardedWriter(staged, plan.specs, plan.options.max_shard_size, resume=True) as writer:
        inputs = read_layer(ckpt, plan.family, plan.layer(index), plan.shape, plan.reads_experts, clock)
        report = compute_layer(plan, inputs, clock)
        del inputs
        with clock("write"):
            record = write_outputs(plan, writer, ckpt, report)
    return_freed_memory()
    return record, dict(clock.seconds)


def compute_layer(plan: RewritePlan, inputs: LayerInputs, clock: StageClock,
                  forward: SequentialForward | None = None) -> LayerReport:
    """The layer's candidates built and the best kept, on the plan's device, from the plan's ranking;
    fitted on the dump's inputs, or on the compressed model's with the sequential `forward`, which then
    runs the layer as compressed."""
    index, options = inputs.layer.index, plan.options
    rows = then = None
    if index in plan.calibrated and forward is not None:
        def rows(router, bias, gating, experts):
            return forward.fit_rows(index, router, bias, gating, experts, options.holdout)

        def then(replace):
            forward.advance(index, replace)
    elif index in plan.calibrated:
        def rows(router, bias, gating, experts):
            return dump_rows(plan.dump, index, options.fit_tokens, plan.device, router, bias, gating, experts,
                             options.holdout)
    return compress_layer(inputs, plan.selection[index], plan.family, plan.shape, rows, plan.groups, options,
                          plan.device, plan.routing, clock, then)


def write_outputs(plan: RewritePlan, writer: ShardedWriter, ckpt: Checkpoint, report: LayerReport) -> dict:
    """Everything the layer's write step writes (the untouched tensors copied with it, then its router and
    experts); returns its journal record, with the checksums of what was written."""
    for name in plan.copy_with[report.index]:
        copy_tensor(writer, ckpt, name)
    write_layer(writer, ckpt, plan.family, plan.layer(report.index), report, plan.dequantized)
    return {**layer_record(report), "checksums": writer.take_checksums()}
