"""compressed-tensors weights to float and back, through the compressed-tensors library (its packing and rounding
are the library's, not copied here): a weight's stored tensors (`weight_packed`, `weight_scale`, ...) in, float32
out; a float weight in, the stored tensors out, with scales from the weight's own minimum and maximum per group
(channel, tensor or block), as compressed-tensors' min-max observer computes them without calibration data."""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..errors import DernError
from .formats import CompressedWeights


def require_compressed_tensors() -> None:
    if importlib.util.find_spec("compressed_tensors") is None:
        raise DernError("compressed-tensors checkpoints need the compressed-tensors library: pip install "
                        "'dern-stream[compressed]'")


@functools.lru_cache(maxsize=8)  # (building a scheme validates it: per weight, that was most of a layer's read time)
def _compressor_and_scheme(fmt: CompressedWeights):
    require_compressed_tensors()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    return BaseCompressor.get_value_from_registry(fmt.format), QuantizationScheme.model_validate(fmt.scheme())


def decompress(fmt: CompressedWeights, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight of one module from its stored tensors (keyed by their suffix: weight_packed, ...)."""
    compressor, scheme = _compressor_and_scheme(fmt)
    return compressor.decompress(dict(stored), scheme)["weight"].float()


def _min_max(weight: torch.Tensor, fmt: CompressedWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's minimum and maximum per quantization group, shaped as the scales."""
    rows, cols = weight.shape
    if fmt.strategy in ("group", "tensor_group"):
        if cols % fmt.group_size:
            raise DernError(f"a weight of {cols} columns does not split into groups of {fmt.group_size}")
        grouped = weight.reshape(rows, cols // fmt.group_size, fmt.group_size)
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    if fmt.strategy == "channel":
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    if fmt.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    br, bc = fmt.block_structure  # block: edge blocks may be partial, as the library pads them
    padded = torch.nn.functional.pad(weight, (0, -cols % bc, 0, -rows % br))
    blocks = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    lo = blocks.amin(dim=(1, 3))
    hi = blocks.amax(dim=(1, 3))
    if rows % br or cols % bc:  # the padding's zeros must not widen an edge block's range
        lo = torch.minimum(lo, _edge_stat(weight, br, bc, torch.amin))
        hi = torch.maximum(hi, _edge_stat(weight, br, bc, torch.amax))
    return lo, hi


def _edge_stat(weight: torch.Tensor, br: int, bc: int, stat) -> torch.Tensor:
    rows, cols = weight.shape
    out = torch.empty(-(-rows // br), -(-cols // bc), dtype=weight.dtype, device=weight.device)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = stat(weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc])
    return out


def compress(fmt: CompressedWeights, weight: torch.Tensor, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The stored tensors (by suffix) of float `weight` in `fmt`, each in the dtype `dtypes` gives for its suffix (the
    input's): scales from the weight's min and max per group, rounded to their stored dtype before the weight is
    quantized with them, so that what is stored dequantizes as it was quantized."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    compressor, scheme = _compressor_and_scheme(fmt)
    weight = weight.float()
    low, high = _min_max(weight, fmt)
    # NVFP4: a global scale over the whole weight first, which the FP8 group scales are relative to
    global_scale = generate_gparam(weight.amin(), weight.amax()) if fmt.strategy == "tensor_group" else None
    scale, zero_point = calculate_qparams(low, high, scheme.weights, global_scale=global_scale)
    # (NVFP4's group scales come back already rounded to FP8 values, and its compressor casts them itself)
    state = {"weight": weight, "weight_scale": scale if global_scale is not None else
             scale.to(dtypes.get("weight_scale", scale.dtype))}
    if global_scale is not None:
        state["weight_global_scale"] = global_scale.reshape(1)
    if not fmt.symmetric:
        state["weight_zero_point"] = zero_point
    out = compressor.compress(state, scheme)
    # (an input_global_scale is the activations', not the weight's: the caller keeps the source expert's)
    return {p: out[p].to(dtypes[p]) if p in dtypes else out[p] for p in fmt.params if p in out}
