"""How many parameters a checkpoint holds, counted from its tensors' shapes (no tensor is read).

Counted as transformers holds the weights unquantized: an MXFP4 weight's `*_blocks` hold two values a
byte, and quantization scales (an FP8 weight's `*_scale_inv`, MXFP4's `*_scales`) are not counted.
Every other stored tensor counts, including the few that transformers keeps as buffers rather than
parameters (DeepSeek-V3's score-correction bias: a model's `num_parameters()` is that much lower)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

_FP8 = ("F8_E4M3", "F8_E5M2")
_FP8_SCALE, _MX_BLOCKS, _MX_SCALES = "_scale_inv", "_blocks", "_scales"


def parameter_counts(tensors: Iterable[tuple[str, str, tuple[int, ...]]],
                     is_routed_expert: Callable[[str], bool]) -> dict[str, int]:
    """{"total", "routed_experts"} of the (name, safetensors dtype, shape) triples."""
    tensors = list(tensors)
    dtypes = {name: dtype for name, dtype, _ in tensors}
    total = routed = 0
    for name, _, shape in tensors:
        if name.endswith(_FP8_SCALE) and dtypes.get(name[:-len(_FP8_SCALE)]) in _FP8:
            continue
        if name.endswith(_MX_SCALES) and name[:-len(_MX_SCALES)] + _MX_BLOCKS in dtypes:
            continue
        values = math.prod(shape) * (2 if name.endswith(_MX_BLOCKS) and dtypes[name] == "U8" else 1)
        total += values
        if is_routed_expert(name):
            routed += values
    return {"total": total, "routed_experts": routed}


def rewrite_parameters(plan, source_entries: dict) -> dict[str, dict[str, int]]:
    """The parameter counts of a rewrite's input (its tensors, `source_entries`) and of its output (the
    plan's tensors), for dern_stream.json's "parameters"."""
    family = plan.family

    def routed_in(layers) -> Callable[[str], bool]:
        moe = {layer.index for layer in layers}
        return lambda name: family.layer_of(name) in moe and family.is_layer_expert_tensor(family.layer_of(name), name)

    return {
        "source": parameter_counts(((n, e.dtype, e.shape) for n, e in source_entries.items()), routed_in(plan.layers)),
        "output": parameter_counts(((s.name, s.dtype, s.shape) for s in plan.specs), routed_in(plan.out_layers)),
    }
