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
class ExpertStorage:
    """`block` is None for plain float weights, else the FP8 scale block (rows, cols)."""

    block: tuple[int, int] | None = None
    pow2_scales: bool = False  # `scale_fmt: ue8m0` (DeepSeek-V3.1/V3.2): every scale a power of two
    mxfp4: bool = False  # gpt-oss: fused experts as MXFP4 `*_blocks` and `*_scales` (storage/mxfp4.py)

    @property
    def fp8(self) -> bool:
        return self.block is not None

    @property
    def quantized(self) -> bool:
        return self.fp8 or self.mxfp4

    def weight_dtypes(self) -> tuple[str, ...]:
        """The experts' own float tensors (MXFP4: the biases beside the blocks)."""
        return ("F8_E4M3",) if self.fp8 else FLOAT_DTYPES

    def tensor_names(self, weight_name: str) -> list[str]:
        """The stored tensors of one weight: itself, and its block scales when FP8."""
        return [weight_name, weight_name + SCALE_SUFFIX] if self.fp8 else [weight_name]

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a layer's experts are held in on the compute device: the stored one (FP8 with its
        scales beside it), or bf16 for MXFP4 (four times its stored bytes); every method computes in
        float32, block by block."""
        import torch

        return torch.bfloat16 if self.mxfp4 else stored


def expert_storage(config: dict) -> ExpertStorage:
    """The storage config.json's quantization_config declares; a format this tool cannot rewrite is one line."""
    q = config.get("quantization_config")
    if not q:
        return ExpertStorage()
    method = q.get("quant_method")
    if method == "mxfp4":
        return ExpertStorage(mxfp4=True)
    if method != "fp8":
        raise DernError(f"quantization_config quant_method {method!r} is not supported; supported: fp8 with "
                        "block scales (weight_block_size), mxfp4 (gpt-oss), or unquantized weights")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise DernError(f"quantization_config weight_block_size is {block!r}; dern-stream rewrites FP8 with "
                        "block scales, e.g. [128, 128] (per-tensor FP8 is not supported)")
    if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
        raise DernError(f"quantization_config fmt {q.get('fmt')!r} is not supported; FP8 weights must be e4m3")
    if q.get("scale_fmt") not in (None, "ue8m0"):
        raise DernError(f"quantization_config scale_fmt {q.get('scale_fmt')!r} is not supported (ue8m0, or none)")
    return ExpertStorage((block[0], block[1]), q.get("scale_fmt") == "ue8m0")
