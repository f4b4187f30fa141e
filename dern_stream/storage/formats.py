"""Which storage a checkpoint's config.json declares for its weights, and the tensors that go with it: names and
shapes only, no torch (the command line checks them before torch loads; the math is in fp8_blocks.py and mxfp4.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..checkpoint.safetensors_format import FLOAT_DTYPES
from ..errors import DernError

if TYPE_CHECKING:
    import torch

SCALE_SUFFIX = "_scale_inv"  # an FP8 weight `W` has its block scales in `W_scale_inv`
MXFP4_GROUP = 32  # values sharing one MXFP4 scale, along the last axis
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"  # an MXFP4 weight `W` is stored as `W_blocks` and `W_scales`


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The grid of FP8 block scales of a [rows, cols] weight (edge blocks may be partial)."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


@dataclass(frozen=True)
class CompressedWeights:
    """The experts' weights as compressed-tensors stores them (llm-compressor's and vLLM's format, and Kimi-K2-
    Thinking's int4 experts): a compressor `format`, the quantization arguments of its config group's weights, and
    the tensors it stores in place of each `.weight` (storage/compressed_tensors.py packs them with the library)."""

    format: str  # pack-quantized, int-quantized, float-quantized
    num_bits: int
    type: str  # int or float
    symmetric: bool
    strategy: str  # group, channel, tensor or block
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    input_scale: bool = False  # NVFP4 with quantized activations: an `input_global_scale` beside each weight

    @property
    def params(self) -> tuple[str, ...]:
        """The stored tensors of a weight, as compressed-tensors names them (suffixes of the module's name)."""
        if self.format == NVFP4:
            return ("weight_packed", "weight_scale", "weight_global_scale") + (
                ("input_global_scale",) if self.input_scale else ())
        first = ("weight_packed", "weight_scale", "weight_shape") if self.format == "pack-quantized" \
            else ("weight", "weight_scale")
        return first + (() if self.symmetric else ("weight_zero_point",))

    def names(self, weight_name: str) -> list[str]:
        """The stored tensors of weight `...proj.weight`: `...proj.weight_packed` and the rest."""
        base = weight_name[:-len("weight")]
        return [base + p for p in self.params]

    def stored_shapes(self, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
        """Each stored tensor's shape for a [rows, cols] weight, by suffix, as compressed-tensors writes them."""
        if self.format == NVFP4:  # two E2M1 values a byte, an FP8 scale per group, a float32 global scale
            shapes = {"weight_packed": (rows, cols // 2), "weight_scale": (rows, -(-cols // self.group_size)),
                      "weight_global_scale": (1,)}
            return {**shapes, **({"input_global_scale": (1,)} if self.input_scale else {})}
        per_group = {"group": (rows, -(-cols // (self.group_size or 1))), "channel": (rows, 1), "tensor": (1,)}
        if self.block_structure:
            per_group["block"] = (-(-rows // self.block_structure[0]), -(-cols // self.block_structure[1]))
        scale = per_group[self.strategy]
        if self.format == "pack-quantized":
            shapes = {"weight_packed": (rows, -(-cols * self.num_bits // 32)), "weight_scale": scale,
                      "weight_shape": (2,)}
            zero_point = (-(-rows * self.num_bits // 32), scale[1])  # packed along the rows
        else:
            shapes, zero_point = {"weight": (rows, cols), "weight_scale": scale}, scale
        if not self.symmetric:
            shapes["weight_zero_point"] = zero_point
        return shapes

    def stored_dtype(self) -> str:
        """The safetensors dtype of the first stored tensor (the packed or quantized values)."""
        if self.format == NVFP4:
            return "U8"
        return "I32" if self.format == "pack-quantized" else ("F8_E4M3" if self.type == "float" else "I8")

    def scheme(self) -> dict:
        """The config group's weights, as compressed-tensors' QuantizationScheme reads them."""
        weights = {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
                   "strategy": self.strategy, "group_size": self.group_size,
                   "block_structure": list(self.block_structure) if self.block_structure else None}
        if self.format == NVFP4:
            weights["scale_dtype"] = "torch.float8_e4m3fn"
        return {"targets": ["Linear"], "weights": weights}


@dataclass(frozen=True)
class ExpertStorage:
    """`block` is None for plain float weights, else the FP8 scale block (rows, cols)."""

    block: tuple[int, int] | None = None
    pow2_scales: bool = False  # `scale_fmt: ue8m0` (DeepSeek-V3.1/V3.2): every scale a power of two
    mxfp4: bool = False  # gpt-oss: fused experts as MXFP4 `*_blocks` and `*_scales` (storage/mxfp4.py)
    compressed: CompressedWeights | None = None  # compressed-tensors (storage/compressed_tensors.py)

    @property
    def fp8(self) -> bool:
        return self.block is not None

    @property
    def quantized(self) -> bool:
        return self.fp8 or self.mxfp4 or self.compressed is not None

    def weight_dtypes(self) -> tuple[str, ...]:
        """The experts' own float tensors (MXFP4: the biases beside the blocks; compressed-tensors: the packed or
        quantized values)."""
        if self.compressed is not None:
            return (self.compressed.stored_dtype(),)
        return ("F8_E4M3",) if self.fp8 else FLOAT_DTYPES

    def tensor_names(self, weight_name: str) -> list[str]:
        """The stored tensors of one weight: itself, and its block scales when FP8; compressed-tensors' own."""
        if self.compressed is not None:
            return self.compressed.names(weight_name)
        return [weight_name, weight_name + SCALE_SUFFIX] if self.fp8 else [weight_name]

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a layer's experts are held in on the compute device: the stored one (FP8 with its
        scales beside it), bf16 for MXFP4 (four times its stored bytes, and exact), float32 for compressed-tensors
        (an int4 value times a bf16 scale needs more bits than bf16 has); every method computes in float32, block
        by block."""
        import torch

        if self.compressed is not None:
            return torch.float32
        return torch.bfloat16 if self.mxfp4 else stored


def expert_storage(config: dict) -> ExpertStorage:
    """The storage config.json's quantization_config declares; a format this tool cannot rewrite is one line."""
    q = config.get("quantization_config")
    if not q:
        return ExpertStorage()
    method = q.get("quant_method")
    if method == "mxfp4":
        return ExpertStorage(mxfp4=True)
    if method == COMPRESSED_TENSORS:
        return ExpertStorage(compressed=compressed_weights(q))
    if method != "fp8":
        raise DernError(f"quantization_config quant_method {method!r} is not supported; supported: fp8 with "
                        f"block scales (weight_block_size), mxfp4 (gpt-oss), {COMPRESSED_TENSORS} "
                        f"({', '.join(COMPRESSED_FORMATS)}), or unquantized weights")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise DernError(f"quantization_config weight_block_size is {block!r}; dern-stream rewrites FP8 with "
                        "block scales, e.g. [128, 128] (per-tensor FP8 is not supported)")
    if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
        raise DernError(f"quantization_config fmt {q.get('fmt')!r} is not supported; FP8 weights must be e4m3")
    if q.get("scale_fmt") not in (None, "ue8m0"):
        raise DernError(f"quantization_config scale_fmt {q.get('scale_fmt')!r} is not supported (ue8m0, or none)")
    return ExpertStorage((block[0], block[1]), q.get("scale_fmt") == "ue8m0")


COMPRESSED_TENSORS = "compressed-tensors"
NVFP4 = "nvfp4-pack-quantized"
COMPRESSED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", NVFP4)
_STRATEGIES = {"pack-quantized": ("group", "channel"), "int-quantized": ("group", "channel", "tensor"),
               "float-quantized": ("channel", "tensor", "block", "group"), NVFP4: ("tensor_group",)}


def compressed_weights(q: dict) -> CompressedWeights:
    """A compressed-tensors quantization_config's weight scheme, checked: one config group, a format this tool
    rewrites, and its arguments (torch-free: the command line reads it before any work)."""
    what = f"quantization_config ({COMPRESSED_TENSORS})"
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        count = len(groups) if isinstance(groups, dict) else 0
        raise DernError(f"{what} has {count} config_groups; dern-stream rewrites checkpoints with exactly one (one "
                        "scheme for every quantized weight)")
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    fmt = (group.get("format") if isinstance(group, dict) else None) or q.get("format")
    if q.get("quantization_status", "compressed") != "compressed":
        raise DernError(f"{what} has quantization_status {q.get('quantization_status')!r}; dern-stream rewrites "
                        "compressed checkpoints (quantization_status compressed)")
    if fmt not in COMPRESSED_FORMATS:
        raise DernError(f"{what} format {fmt!r} is not supported; supported: {', '.join(COMPRESSED_FORMATS)} "
                        "(the mixed and sparse formats are not yet)")
    if not isinstance(weights, dict):
        raise DernError(f"{what} config group has no weights scheme")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type", "int"), weights.get("strategy")
    symmetric, group_size, block = weights.get("symmetric", True), weights.get("group_size"), \
        weights.get("block_structure")
    if kind not in ("int", "float") or type(bits) is not int or not (fmt == "pack-quantized" and kind == "int"
                                                                     and 1 <= bits <= 8 or bits == 8
                                                                     or fmt == NVFP4 and bits == 4):
        raise DernError(f"{what}: {fmt} weights of {bits} bit(s) of type {kind!r} are not supported")
    if (fmt in ("float-quantized", NVFP4)) != (kind == "float"):
        raise DernError(f"{what}: format {fmt} does not store {kind} weights")
    if strategy not in _STRATEGIES[fmt] or weights.get("dynamic") not in (None, False):
        raise DernError(f"{what}: {fmt} weights with strategy {strategy!r}"
                        + (" and dynamic quantization" if weights.get("dynamic") else "")
                        + f" are not supported; supported strategies: {', '.join(_STRATEGIES[fmt])}")
    if strategy in ("group", "tensor_group") and not (type(group_size) is int and group_size > 0):
        raise DernError(f"{what}: group strategy with group_size {group_size!r}; expected a positive integer")
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                    and all(type(b) is int and b > 0 for b in block)):
        raise DernError(f"{what}: block strategy with block_structure {block!r}; expected [rows, cols]")
    if weights.get("actorder") not in (None, False):
        raise DernError(f"{what}: weights quantized with GPTQ's activation ordering (actorder "
                        f"{weights.get('actorder')!r}, a weight_g_idx per weight) are not supported")
    if not isinstance(symmetric, bool):
        raise DernError(f"{what}: symmetric is {symmetric!r}; expected true or false")
    if fmt == NVFP4 and not symmetric:
        raise DernError(f"{what}: {fmt} weights are symmetric (symmetric: false is not supported)")
    activations = group.get("input_activations")
    return CompressedWeights(fmt, bits, kind, symmetric, strategy,
                             group_size if strategy in ("group", "tensor_group") else None,
                             tuple(block) if strategy == "block" else None,
                             fmt == NVFP4 and isinstance(activations, dict)
                             and activations.get("dynamic", False) is False)  # (static: a stored input scale)
