"""How a checkpoint stores its expert weights: plain floats, or FP8 with block scales (quantization_config)."""

from . import mxfp4
from .formats import ExpertStorage, expert_storage
from .fp8_blocks import dequantize, quantize

__all__ = ["ExpertStorage", "dequantize", "expert_storage", "mxfp4", "quantize"]
