"""One MoE layer of a plan, start to finish, in whatever process runs it (a local worker or a Ray task).

The driver has laid out the output shards already (headers written, sizes reserved); the task reads
its layer, computes it, writes its tensors at the plan's offsets, and flushes them before it returns
the layer's record. The driver journals the record: a layer counts as done only then.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import torch

from .audit import layer_record
from .checkpoint import Checkpoint, ShardedWriter
from .errors import DernError
from .host_memory import return_freed_memory
from .layer_rewrite import compress_layer, copy_tensor, read_layer, write_layer
from .rewrite_plan import RewritePlan
from .stage_clock import StageClock


def run_pickled(plan: bytes, staged: Path, index: int) -> tuple[dict, dict[str, float]]:
    """run_layer for a plan pickled by the driver. A local pool sends it as plain bytes: torch would pass
    the plan's tensors to the workers as shared file descriptors, whose serving thread in the driver
    prints a traceback when a worker is stopped mid-transfer."""
    return run_layer(_unpickled(plan), staged, index)


@functools.lru_cache(maxsize=1)
def _unpickled(plan: bytes) -> RewritePlan:
    return pickle.loads(plan)  # once per worker process: every layer it runs shares the plan


def run_layer(plan: RewritePlan, staged: Path, index: int) -> tuple[dict, dict[str, float]]:
    """Rewrite MoE layer `index` of `plan` into the shards in `staged`. Returns its journal record (with
    the checksums of what it wrote) and its busy seconds per stage."""
    # As many threads as the driver (Ray gives a task 1 by default): CPU kernels may sum in another order
    # with another count, and the layer must come out as one process computes it.
    torch.set_num_threads(plan.threads)
    layer = next((layer for layer in plan.layers if layer.index == index), None)
    if layer is None:
        raise DernError(f"internal error: layer {index} is not in the plan")
    ckpt = Checkpoint(plan.source)
    if ckpt.fingerprint() != plan.fingerprint:
        raise DernError(f"{plan.source} changed after the plan was made (seen by the worker of layer {index})")
    clock = StageClock(plan.device)
    # Leaving the block flushes every shard written to disk before the record leaves (or raises the error).
    with ckpt, ShardedWriter(staged, plan.specs, plan.options.max_shard_size, resume=True) as writer:
        inputs = read_layer(ckpt, plan.family, layer, plan.shape, plan.reads_experts, clock)
        dump = plan.dump if index in plan.calibrated else None
        report = compress_layer(inputs, plan.selection[index], plan.family, plan.shape, dump, plan.groups,
                                plan.options, plan.device, plan.routing, clock)
        del inputs
        with clock("write"):
            for name in plan.copy_with[index]:
                copy_tensor(writer, ckpt, name)
            write_layer(writer, ckpt, plan.family, layer, report, plan.dequantized)
            record = {**layer_record(report), "checksums": writer.take_checksums()}
    return_freed_memory()
    return record, dict(clock.seconds)
