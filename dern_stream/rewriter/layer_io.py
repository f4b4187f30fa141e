"""One MoE layer's tensors in and out: its router and experts read from the input (FP8 as stored, MXFP4 and fused
layouts sliced per expert), and the result written in the input's layout (unchanged experts as raw bytes,
rebuilt ones quantized again)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..checkpoint import Checkpoint, NonFiniteTensor, ShardedWriter
from ..checkpoint.integrity import all_finite
from ..checkpoint.safetensors_format import DTYPES
from ..errors import DernError
from ..experts.forward import LayerRouting
from ..experts.result import LayerResult, output_bias
from ..experts.segments import ExpertStack
from ..families import PARTS, Family
from ..layout.fused_tensors import fused_tensors
from ..layout.moe_layers import ModelShape, MoELayer, router_input_scale
from ..runtime.stage_clock import NO_CLOCK, StageClock
from ..storage import compressed_tensors, dequantize, mxfp4, quantize
from ..storage.finite_values import dequantized_problem, mxfp4_problem
from ..storage.formats import MXFP4_BLOCKS, SCALE_SUFFIX, ExpertStorage
from ..storage.reading import load_weight
from .layer_report import LayerReport


@dataclass
class LayerInputs:
    """What the computation needs of one layer: router (and bias) in host memory, and the experts' bytes
    prefetched into the page cache and read on the computing thread (`experts` loads them)."""

    layer: MoELayer
    router: torch.Tensor  # the routed experts' rows [N, d]
    bias: torch.Tensor | None
    experts: Callable[[torch.device], ExpertStack] | None  # None when the options never look at expert weights
    # The zero experts' rows and bias entries that follow (LongCat-Flash), else None: Gating.with_passive.
    passive_router: torch.Tensor | None = None
    passive_bias: torch.Tensor | None = None
    # What the router's rows multiply is the experts' input times this [d] vector (Gemma 4), else None.
    input_scale: torch.Tensor | None = None

    def layer_routing(self, routing: LayerRouting, device: torch.device | None = None) -> LayerRouting:
        """The family's routing with this layer's own data: its zero experts (LongCat-Flash, routed as they were,
        before and after) and its router's input scale (Gemma 4), on `device` (None: where they are)."""
        def on(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None and device is not None else t

        return LayerRouting(*(g.with_passive(on(self.passive_router), on(self.passive_bias))
                              .with_input_scale(on(self.input_scale)) for g in (routing.before, routing.after)))


def read_layer(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, with_experts: bool,
               clock: StageClock = NO_CLOCK) -> LayerInputs:
    """The layer's router (and bias); its experts are read later, by the computation (read_experts),
    from the page cache once Checkpoint.prefetch has brought them in."""
    with clock("read"):
        router = ckpt.load(family.router_name(layer.index))
        # [N], whether stored as [N] or [1, N] (ERNIE)
        bias = ckpt.load(family.bias_name(layer.index)).reshape(-1) if layer.bias is not None else None
        scale = router_input_scale(ckpt, family, layer.index)
    experts = partial(read_experts, ckpt, family, layer, shape, clock=clock) if with_experts else None
    n = shape.num_experts
    if router.shape[0] == n:
        return LayerInputs(layer, router, bias, experts, input_scale=scale)
    return LayerInputs(layer, router[:n], bias[:n] if bias is not None else None, experts, router[n:],
                       bias[n:] if bias is not None else None, scale)


def read_experts(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, device: torch.device,
                 clock: StageClock = NO_CLOCK) -> ExpertStack:
    """The layer's routed experts as one stack on `device`, as stored: FP8 stays FP8 with its block scales
    (the methods dequantize what they read), MXFP4 is dequantized to bf16. Host memory: the stack itself on
    CPU; one tensor at a time (a staging buffer) for an accelerator."""
    stored, storage = DTYPES[layer.dtype], layer.storage
    with clock("read"):
        stack = ExpertStack.empty(shape.num_experts, shape.intermediate, shape.hidden,
                                  storage.compute_dtype(stored), device,
                                  biases=family.fused is not None and family.fused.biased, block=storage.block,
                                  quantized=storage.mxfp4 or storage.compressed is not None)
        if family.fused is not None:
            _read_fused(ckpt, family, layer, shape, stack)
            return stack
        if storage.compressed is not None:
            _read_compressed(ckpt, family, layer, shape, stack)
            return stack
        staging: dict[tuple[int, ...], torch.Tensor] = {}  # one host buffer per tensor shape
        for e in range(shape.num_experts):
            for p, part in enumerate(PARTS):
                name, slot = family.expert_name(layer.index, e, part), getattr(stack, part)[e]
                if storage.fp8:
                    stack.scales[p][e].copy_(ckpt.load(name + SCALE_SUFFIX))
                if slot.device.type == "cpu":
                    ckpt.read_into(name, slot)
                    continue
                host = staging.get(tuple(slot.shape))
                if host is None:
                    host = staging[tuple(slot.shape)] = torch.empty(slot.shape, dtype=stored)
                ckpt.read_into(name, host)
                slot.copy_(host)  # synchronous from pageable memory: the buffer is free again after
    return stack


def _read_compressed(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape,
                     stack: ExpertStack) -> None:
    """Fill `stack` (float32) with the layer's compressed-tensors experts, decompressed one weight at a time (those the
    config leaves unquantized as they are stored)."""
    fmt = layer.storage.compressed
    for e in range(shape.num_experts):
        for part in PARTS:
            name = family.expert_name(layer.index, e, part)
            weight = ckpt.load(name).float() if e in layer.plain else compressed_tensors.decompress(
                fmt, {p: ckpt.load(stored) for p, stored in zip(fmt.params, fmt.names(name), strict=True)})
            slot = getattr(stack, part)[e]
            if tuple(weight.shape) != tuple(slot.shape):
                raise DernError(f"{name} decompresses to shape {list(weight.shape)} (its weight_shape), the config "
                                f"implies {list(slot.shape)}")
            slot.copy_(weight)


def _read_fused(ckpt: Checkpoint, family: Family, layer: MoELayer, shape: ModelShape, stack: ExpertStack) -> None:
    """Fill `stack` from a fused layout: one pread per expert and tensor, through a host buffer of one slice
    (MXFP4: dequantized from it)."""
    for e in range(shape.num_experts):
        slices = _read_slices(ckpt, family, layer, shape.hidden, shape.intermediate, e)
        gate, up, down, bias, down_bias = family.fused.split(to_float(slices, layer.storage))
        for target, tensor in ((stack.gate, gate), (stack.up, up), (stack.down, down), (stack.bias, bias),
                               (stack.down_bias, down_bias)):
            if tensor is not None:
                target[e].copy_(tensor)


class RequantizationError:
    """||dequant(quant(W)) - W|| / ||W|| over a layer's rebuilt weights, summed tensor by tensor (float64)."""

    def __init__(self) -> None:
        self.diff = self.norm = 0.0

    def add(self, weight: torch.Tensor, back: torch.Tensor) -> None:
        self.diff += float((back.float() - weight.float()).double().square().sum())
        self.norm += float(weight.double().square().sum())

    def value(self) -> float | None:
        return (self.diff / self.norm) ** 0.5 if self.norm > 0 else None


def expert_tensor_names(family: Family, layer: MoELayer, experts: int) -> list[str]:
    """Every stored tensor of experts 0..experts-1 of `layer`: weights, and their scales when FP8 (a
    fused layout: its two tensors, whatever `experts` is)."""
    if family.fused is not None:
        return [t.name for t in fused_tensors(family, layer.index, 0, 0, layer.storage)]
    return [t for k, name in enumerate(family.expert_names(layer.index, experts))
            for t in layer.tensor_names(name, k // len(PARTS))]


def layer_output_names(family: Family, layer: MoELayer, experts: int) -> list[str]:
    """The output tensors write_layer writes for `layer`."""
    names = [family.router_name(layer.index)] + ([family.bias_name(layer.index)] if layer.bias is not None else [])
    return names + expert_tensor_names(family, layer, experts)


def copy_tensor(writer: ShardedWriter, ckpt: Checkpoint, name: str) -> None:
    """An input tensor into the output unchanged (raw bytes), or dequantized where the plan says bf16. A quantized
    weight must be finite once dequantized, as its bytes must be."""
    _check_dequantized(ckpt, name)
    if writer.specs[name].dtype == ckpt.entries[name].dtype:
        writer.copy_raw(name, ckpt.entries[name])
    else:
        writer.write(name, load_weight(ckpt, name).to(DTYPES[writer.specs[name].dtype]))


def _check_dequantized(ckpt: Checkpoint, name: str) -> None:
    problem = dequantized_problem(ckpt, name)
    if problem is not None:
        raise NonFiniteTensor(f"{problem}: the input weights are not finite", copied=True)


def write_layer(
    writer: ShardedWriter, ckpt: Checkpoint, family: Family, layer: MoELayer, report: LayerReport,
    dequantized: bool = False,
) -> None:
    """Router rows, score-correction bias and experts renumbered 0..K-1 in kept order.

    Experts that DERN left unchanged are copied as raw bytes (with their FP8 scales), so they are
    bit-identical to the input. Rebuilt FP8 experts are quantized again with the input's block scheme, one
    tensor at a time on the device that built them (one tensor's bytes cross to the host); the relative
    error that adds is recorded (`requantization_error`). `dequantized`: every expert is written in bf16
    instead, without scales.
    """
    result, i = report.result, layer.index
    error = RequantizationError()
    try:
        # The zero experts' rows (LongCat-Flash) follow the kept experts' as they are: they are not weights.
        routed, passive = family.num_experts(ckpt.config), family.passive_experts(ckpt.config)
        rows = result.router.cpu()
        writer.write(family.router_name(i), torch.cat([rows, ckpt.load(family.router_name(i))[routed:]]) if passive
                     else rows)
        if layer.bias is not None:
            # A load-balancing term, not a routing weight: the kept experts keep their values (docs/method.md, Stage 2).
            full = ckpt.load(family.bias_name(i))
            kept = output_bias(family, full[..., :routed], result, family.intermediate_size(ckpt.config))
            writer.write(family.bias_name(i), torch.cat([kept, full[..., routed:]], dim=-1) if passive else kept)
        dtype = torch.bfloat16 if dequantized else DTYPES[layer.dtype]
        if family.fused is not None:
            report.requantization_error = _write_fused(writer, ckpt, family, layer, result, dequantized)
            return
        for pos, (expert, rebuilt) in enumerate(zip(result.kept, result.experts, strict=True)):
            for part in PARTS:
                name, source = family.expert_name(i, pos, part), family.expert_name(i, expert, part)
                _write_part(writer, ckpt, layer, name, source, getattr(rebuilt, part) if rebuilt is not None
                            else None, dtype, dequantized, error, expert)
    except NonFiniteTensor as e:
        if e.copied:
            raise
        raise NonFiniteTensor(f"{e}: {_non_finite_cause(ckpt, family, layer)}", copied=False) from None
    if error.value() is not None:
        report.requantization_error = error.value()


def _write_part(writer: ShardedWriter, ckpt: Checkpoint, layer: MoELayer, name: str, source: str,
                rebuilt: torch.Tensor | None, dtype: torch.dtype, dequantized: bool,
                error: RequantizationError, expert: int) -> None:
    """One projection of kept expert `expert` as output tensor `name`: the input's `source` as it is (raw bytes, with
    its scales) or dequantized, or the `rebuilt` weight, quantized again where the input is FP8 or compressed-tensors
    (an expert the config leaves unquantized stays so: the output's config says so of it too)."""
    storage, plain = layer.storage, expert in layer.plain
    planned_plain = not any(t in writer.specs for t in storage.tensor_names(name) if t != name)
    if storage.compressed is not None and not dequantized and plain != planned_plain:  # (the plan's kept, changed)
        raise DernError(f"internal error: {name} was planned {'un' * (not plain)}quantized, but its expert "
                        f"{source} is not; nothing of the layer is journaled")
    if rebuilt is None:
        _check_dequantized(ckpt, source)
    if rebuilt is None and dequantized:
        writer.write(name, load_weight(ckpt, source).to(dtype))
    elif rebuilt is None:
        for out, src in zip(layer.tensor_names(name, expert), layer.tensor_names(source, expert), strict=True):
            writer.copy_raw(out, ckpt.entries[src])
    elif plain and not dequantized:
        writer.write(name, rebuilt.to(DTYPES[layer.plain_dtype]).cpu())
    elif storage.compressed is not None and not dequantized:
        fmt, dtypes = storage.compressed, {p: DTYPES[d] for p, d in layer.stored_dtypes}
        stored = compressed_tensors.compress(fmt, rebuilt.float(), dtypes)
        error.add(rebuilt, compressed_tensors.decompress(fmt, stored))
        for out, src, p in zip(fmt.names(name), fmt.names(source), fmt.params, strict=True):
            if p in stored:
                writer.write(out, stored[p].cpu())
            else:  # NVFP4's input_global_scale, the activations' scale: the kept expert's
                writer.copy_raw(out, ckpt.entries[src])
    elif storage.fp8 and not dequantized:
        weight = rebuilt.float()
        q, scale = quantize(weight, storage.block, DTYPES[layer.scale_dtype], storage.pow2_scales)
        error.add(weight, dequantize(q, scale, storage.block))
        writer.write(name, q.cpu())
        writer.write(name + SCALE_SUFFIX, scale.cpu())
    else:
        writer.write(name, rebuilt.to(dtype).cpu())  # the only device-to-host copy


def _write_fused(writer: ShardedWriter, ckpt: Checkpoint, family: Family, layer: MoELayer, result: LayerResult,
                 dequantized: bool) -> float | None:
    """The K experts in the input's fused layout: a kept expert nothing changed is its input slice's bytes,
    read straight into place; a rebuilt one is laid out again (gate/up order and interleaving kept, MXFP4
    quantized again). `dequantized`: every expert in bf16, in the family's float layout. Returns the
    MXFP4 requantization error of the rebuilt experts' weights (relative, as for FP8), else None."""
    error = RequantizationError()
    hidden = int(ckpt.config["hidden_size"])
    out_storage = ExpertStorage() if dequantized else layer.storage
    stored = fused_tensors(family, layer.index, hidden, 0, out_storage)  # (for their names and layout)
    names = [t.name for t in stored]
    tensors = [torch.empty(writer.specs[n].shape, dtype=DTYPES[writer.specs[n].dtype]) for n in names]
    outputs = [t.experts_view(tensor, len(result.kept)) for t, tensor in zip(stored, tensors, strict=True)]
    float_dtype = torch.bfloat16 if dequantized else DTYPES[layer.dtype]
    h_in = family.intermediate_size(ckpt.config)
    for pos, (expert, rebuilt) in enumerate(zip(result.kept, result.experts, strict=True)):
        if rebuilt is None and not dequantized:
            for t, out in zip(stored, outputs, strict=True):
                t.read_expert(ckpt, expert, out[pos])
            continue
        if rebuilt is None:
            floats = to_float(_read_slices(ckpt, family, layer, hidden, h_in, expert), layer.storage)
        else:
            down_bias = rebuilt.down_bias
            if family.fused.biased and down_bias is None:  # DERN keeps the kept expert's own (one per expert)
                down_bias = _row(ckpt, family.fused_names(layer.index)[-1], expert, DTYPES[layer.dtype])
            floats = family.fused.join(*(t.float().cpu() if t is not None else None for t in (
                rebuilt.gate, rebuilt.up, rebuilt.down, rebuilt.bias, down_bias)))
        # MXFP4 quantizes the weights from float32 (no bf16 rounding first); the biases are stored as they are
        weights = 2 if out_storage.mxfp4 else 0
        parts = from_float([t.float() for t in floats[:weights]] + [t.to(float_dtype) for t in floats[weights:]],
                           out_storage)
        if rebuilt is not None and out_storage.mxfp4:
            for weight, back in zip(floats[:2], to_float(parts, out_storage)[:2], strict=True):
                error.add(weight, back)
        for out, part in zip(outputs, parts, strict=True):
            out[pos].copy_(part)
    if out_storage.mxfp4:  # a kept expert's input bytes (the rebuilt ones are quantized anew, from finite values)
        for blocks, scales, name in zip(outputs[0:4:2], outputs[1:4:2], names[0:4:2], strict=True):
            problem = mxfp4_problem(blocks, scales, name.removesuffix(MXFP4_BLOCKS))
            if problem is not None:
                raise NonFiniteTensor(f"{problem}: the input weights are not finite", copied=True)
    for name, tensor in zip(names, tensors, strict=True):
        writer.write(name, tensor)
    return error.value()


def _read_slices(ckpt: Checkpoint, family: Family, layer: MoELayer, hidden: int, intermediate: int,
                 expert: int) -> list[torch.Tensor]:
    """One expert's slice of each stored tensor of a fused layer, each read with one pread."""
    out = []
    for t in fused_tensors(family, layer.index, hidden, intermediate, layer.storage):
        buffer = torch.empty(t.slice_shape, dtype=DTYPES[t.dtype or layer.dtype])
        t.read_expert(ckpt, expert, buffer)
        out.append(buffer)
    return out


def _row(ckpt: Checkpoint, name: str, index: int, dtype: torch.dtype) -> torch.Tensor:
    """Entry `index` of a tensor's leading dimension, read alone."""
    out = torch.empty(1, *ckpt.entries[name].shape[1:], dtype=dtype)
    ckpt.read_rows_into(name, index, out)
    return out[0]


def _non_finite_cause(ckpt: Checkpoint, family: Family, layer: MoELayer) -> str:
    """Why a rebuilt tensor of `layer` is not finite: the first input tensor of the layer that is not,
    or else overflow of the stored dtype. Read only on this failure path."""
    i = layer.index
    names = [family.router_name(i), *([family.bias_name(i)] if layer.bias is not None else []),
             *expert_tensor_names(family, layer, family.num_experts(ckpt.config))]
    for name in names:
        if not all_finite(ckpt.load(name)):
            return f"the input's {name} holds NaN or Inf (the input weights are not finite)"
    weights = family.fused_names(i)[:2] if family.fused is not None else family.expert_names(i, family.num_experts(
        ckpt.config))
    for name in weights:
        problem = dequantized_problem(ckpt, name)
        if problem is not None:
            return f"the input's {problem} (the input weights are not finite)"
    return f"the input weights of layer {i} are finite, so the rebuilt values overflow {layer.dtype}"


def to_float(slices: list[torch.Tensor], storage: ExpertStorage) -> list[torch.Tensor]:
    """One expert's stored slices -> its slices in the family's float layout (FusedExperts.split's input)."""
    if not storage.mxfp4:
        return slices
    gate_up = mxfp4.dequantize(slices[0], slices[1]).T
    down = mxfp4.dequantize(slices[2], slices[3]).T
    return [gate_up, down, *slices[4:]]


def from_float(slices: list[torch.Tensor], storage: ExpertStorage) -> list[torch.Tensor]:
    """to_float's inverse (MXFP4: quantized again)."""
    if not storage.mxfp4:
        return slices
    gate_up, down = mxfp4.quantize(slices[0].T), mxfp4.quantize(slices[1].T)
    return [*gate_up, *down, *slices[2:]]
