"""What a rewrite will cost, from the shapes alone: peak host and device memory, and compute per layer.

The memory terms follow what the executor holds at its peak (docs/performance.md, "Memory"): one layer's experts as
stored, the results of two layers (the one computed, the one written), the similarity and k-means blocks,
the writer's buffer, and when the options use the layer's outputs, the fit sample and one block of the
dump it is read from. (The plan reads the dump before the execution starts, a block at a time.) Tests
compare the host figure, and on CUDA the device figure, with a measured rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..experts.forward import row_block
from ..fit.gradient_refit import BATCH_ROWS, CHECK_EVERY
from ..layout.moe_layers import ModelShape
from ..methods import method_named
from ..options import RewriteOptions
from ..runtime.arguments import format_size
from ..runtime.device import memory_size
from ..storage import ExpertStorage
from ..storage.formats import scale_shape

BASELINE_BYTES = 300 * 10**6  # Python + torch + dern_stream imported (docs/performance.md, "Memory")
CUDA_CONTEXT_BYTES = 1200 * 10**6  # the CUDA runtime and libraries in host memory (docs/performance.md, "On a GPU")
WRITER_BUFFER_BYTES = 16 * 2**20  # checkpoint/writer.py _COPY_CHUNK
# Per tensor of the input: its entry in the checkpoint's index, and its share of the plan's (its output spec, journal
# and checksum records). 810 bytes an entry measured for the index alone on a Kimi-K2-sized one of 211246 tensors,
# 1.5 kB with the rest (docs/performance.md, "Memory").
TENSOR_ENTRY_BYTES = 1600
DUMP_BLOCK_BYTES = 64 * 2**20  # one read block of the dump as float32 (calib/store.py _READ_BLOCK)
# torch gives each thread that runs matrix products on a GPU its own cuBLAS workspace from the caching allocator
# (32 MiB on Hopper, less on older GPUs); the rewrite's computation and its routing statistics are two such threads.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
DEVICE_THREADS = 2


@dataclass(frozen=True)
class LayerCompute:
    """Floating-point operations of one MoE layer's stages, in GFLOP (upper bounds: every pooled segment
    moved, every k-means iteration run)."""

    importance: float
    reassign: float
    cluster: float
    fit: float

    @property
    def total(self) -> float:
        return self.importance + self.reassign + self.cluster + self.fit


@dataclass(frozen=True)
class Estimates:
    host_peak: int
    device_peak: int | None  # None when the computation runs in host memory (CPU)
    per_layer: LayerCompute  # the largest layer (layers share their shape)


def expert_bytes(shape: ModelShape, experts: int, width: int, bytes_per_value: float, storage: ExpertStorage) -> int:
    """`experts` experts of `width` neurons: gate, up and down, plus FP8 block scales."""
    n = 3 * experts * width * shape.hidden * bytes_per_value
    if storage.fp8:
        grid = scale_shape((width, shape.hidden), storage.block)
        n += 3 * experts * grid[0] * grid[1] * 4
    return int(n)


def estimate(shape: ModelShape, options: RewriteOptions, storage: ExpertStorage, stored_bytes: float,
             tokens: int, top_k: int, reads_experts: bool, on_device: bool, tensors: int = 0) -> Estimates:
    """`stored_bytes`: bytes per expert weight value as stored (FP8 1, MXFP4 0.5, bf16 2); `tokens`: cached
    inputs per layer (0 without a dump); `tensors`: the input's tensor count."""
    n, k, h, d = shape.num_experts, options.experts, shape.intermediate, shape.hidden
    width = options.intermediate_size or h
    held = 0
    if reads_experts:  # the layer's experts as the methods hold them: as stored, MXFP4 as bf16
        # (MXFP4 held as bf16, compressed-tensors as float32: storage.formats.ExpertStorage.compute_dtype)
        held_bytes = 2 if storage.mxfp4 else 4 if storage.compressed is not None else stored_bytes
        held = expert_bytes(shape, n, h, held_bytes, ExpertStorage() if storage.compressed is not None else storage)
    result_bytes = 4 if storage.quantized else stored_bytes  # quantized: float32 until written
    results = expert_bytes(shape, k, width, result_bytes, ExpertStorage()) if reads_experts else 0
    # The reassignment's kept, pooled and cosine buffers, and the temporaries of the products over them.
    blocks = 4 * options.similarity_block_bytes if reads_experts else 0
    rows = min(tokens, options.fit_tokens)  # the fit sample
    fit = 0
    if options.fits_layers(n, h) and tokens:
        # the sample, target, output and residual in float32, and a block of the dump (1.5x: its stored copy)
        fit = 4 * rows * d * 4 + int(1.5 * min(DUMP_BLOCK_BYTES, tokens * d * 4))
        # One block of one kept expert's rows at a time in the forwards and the down refit (methods/moe_forward.py):
        # their gate and up activations and features (width each) and four row-sized copies; an expert takes up to
        # twice the mean load.
        fit += min(rows, 2 * rows * top_k // max(1, k), row_block(width, d)) * (3 * width + 4 * d) * 4
    if options.refit and tokens:
        # The down refit's normal equations of one expert: the Gram matrix in float32 and float64 and the solver's
        # copy (width x width), the right-hand side, the solution and a temporary (width x d, float64).
        fit += 20 * width * width + 24 * width * d
    if options.refit_steps and tokens:
        # Per weight moved, float32: the weight, its gradient, Adam's two moments, the best so far, and one tensor's
        # temporaries; a batch's activations; the fitting and held-out rows copied out of the sample.
        group = _group_size(options, k)
        fit += 22 * 3 * group * width * d + 8 * BATCH_ROWS * top_k * width * 4 + 2 * rows * d * 4
        if group < k:  # the float32 result; the layer's output, a group's own output, inputs and target, held-out too
            fit += 4 * 3 * k * width * d + 5 * rows * d * 4
    work = held + 2 * results + blocks + fit
    if options.sequential:  # the decoder layer the forward runs, and the hidden states of the fit tokens
        work += held + rows * d * 4
    host = BASELINE_BYTES + WRITER_BUFFER_BYTES + TENSOR_ENTRY_BYTES * tensors
    if on_device:
        return Estimates(host + CUDA_CONTEXT_BYTES + results, work + DEVICE_THREADS * CUBLAS_WORKSPACE_BYTES,
                         _compute(shape, options, tokens, top_k))
    return Estimates(host + work, None, _compute(shape, options, tokens, top_k))


def _compute(shape: ModelShape, options: RewriteOptions, tokens: int, top_k: int) -> LayerCompute:
    n, k, h, d = shape.num_experts, options.experts, shape.intermediate, shape.hidden
    reassign, cluster = method_named(options.method).compute_gflop(shape, options)
    candidates = len(options.alpha_candidates or ()) or 1
    forward = 2 * min(tokens, options.fit_tokens) * top_k * 3 * h * d
    # Each candidate is judged once per refit variant; a down refit costs about two forwards (its sweeps); with a
    # held-out share, nothing refitted is tried too, and the best setting's down refit at three more ridges.
    variants = (1 + options.refit_router) if options.refit else 1
    refits = candidates * variants * 2 * options.refit + (3 * 2 * options.refit if options.holdout else 0)
    fit = forward * (candidates * variants + 1 + refits) if options.fits_layers(n, h) else 0
    if options.refit_steps:  # a step is a forward and a backward (about 3 forwards) of a batch; chosen, then rerun
        batch = min(tokens, options.fit_tokens, BATCH_ROWS) / max(1, min(tokens, options.fit_tokens))
        fit += forward * options.refit_steps * (3 * batch * (1 + bool(options.holdout)) * _group_work(options, k, top_k)
                                                + (options.holdout / CHECK_EVERY))
    return LayerCompute(2 * tokens * n * d / 1e9, reassign, cluster, fit / 1e9)


def _group_work(options: RewriteOptions, k: int, top_k: int) -> float:
    """The steps' work with --refit-group against all experts moved together: every group takes the full step count
    with full batches of the rows routed to it, and computes only its own experts' share of their slots."""
    group = _group_size(options, k)
    if group >= k:
        return 1.0
    share = group / k
    return -(-k // group) * share / (1 - (1 - share) ** min(top_k, k))


def _group_size(options: RewriteOptions, k: int) -> int:
    """Kept experts the gradient refit moves together (methods/gradient_refit.py)."""
    return min(options.refit_group or k, k)


def _peak(costs: Estimates) -> int:
    return costs.device_peak if costs.device_peak is not None else costs.host_peak


def memory_note(costs: Estimates, options: RewriteOptions, device: torch.device, tokens: int,
                 costs_of: Callable[[RewriteOptions], Estimates]) -> str | None:
    """Said before a run whose estimated peak exceeds the memory it computes in, with what lowers the peak."""
    peak = _peak(costs)
    total = memory_size(device)
    if total is None or peak <= total:
        return None
    where = str(device) if costs.device_peak is not None else "host memory"
    lower = []
    if options.refit_steps and tokens:
        # The gradient refit's Adam state is the largest part on large models: the largest group of experts that fits.
        group = (options.refit_group or options.experts) // 2
        while group >= 1 and _peak(costs_of(replace(options, refit_group=group))) > total:
            group //= 2
        if group >= 1:
            lower.append(f"--refit-group {group} (the gradient refit holds about 22 bytes per weight of the experts "
                         "it moves together)")
        lower.append("--refit-steps 0")
    if options.uses_layer_outputs and tokens:
        lower.append(f"a smaller --fit-tokens (now {min(tokens, options.fit_tokens)} rows per layer)")
    if costs.device_peak is not None:
        lower.append("--device cpu")
    advice = f"; lower it with {', or '.join(lower)}" if lower else ""
    return (f"the estimated peak of {format_size(peak)} exceeds the {format_size(total)} of {where}: the run may "
            f"stop out of memory{advice} (docs/performance.md, \"The fit on large layers\")")
