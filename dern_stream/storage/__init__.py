"""How a checkpoint stores its expert weights: plain floats, FP8 with block scales, or MXFP4 (quantization_config).

The names load their modules on first use (PEP 562): the command line reads a config's storage without torch, which
the quantization math needs."""

from __future__ import annotations

from ..runtime.lazy_exports import lazy_exports

_EXPORTS = {
    "ExpertStorage": ".formats", "expert_storage": ".formats",
    "dequantize": ".fp8_blocks", "quantize": ".fp8_blocks",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
