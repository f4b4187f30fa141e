"""Integrity of stored bytes: checksums of what is written (checksums.py, re-exported here), and whether
float values are finite."""

from __future__ import annotations

import numpy as np
import torch

from .checksums import CHECKSUM, checksum, new_hasher
from .safetensors_format import DTYPES

__all__ = ["CHECKSUM", "all_finite", "bytes_finite", "checksum", "new_hasher"]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating-point tensor (always True for other dtypes). One pass, no
    tensor-sized mask: min and max are NaN if any value is, and infinite if any value is."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:
        return _float8_finite(t)
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


# float8 values that are not finite, by their bits: E4M3FN has no Inf and NaN is S.1111.111; E5M2 is IEEE-like, Inf and
# NaN have the exponent S.11111.xx. So a value is not finite exactly when (bits & mask) == mask, and the largest masked
# byte says whether any is (far faster than converting them: docs/performance.md, "Checksums and finiteness checks").
_FLOAT8_NONFINITE_MASK = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _float8_finite(t: torch.Tensor) -> bool:
    mask = _FLOAT8_NONFINITE_MASK.get(t.dtype)
    if mask is None:  # another float8 flavour: float16 holds every float8 value exactly
        return bool(torch.isfinite(torch.stack(torch.aminmax(t.to(torch.float16)))).all())
    data = t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
    scratch = np.empty(min(len(data), _FLOAT8_CHUNK), dtype=np.uint8)  # 1 MiB: stays in cache
    for start in range(0, len(data), _FLOAT8_CHUNK):
        part = scratch[:min(_FLOAT8_CHUNK, len(data) - start)]
        np.bitwise_and(data[start:start + len(part)], mask, out=part)
        if part.max() == mask:
            return False
    return True


_FLOAT8_CHUNK = 1 << 20


def bytes_finite(data: memoryview, dtype: str) -> bool:
    """all_finite of raw stored bytes of safetensors dtype `dtype` (a whole number of elements)."""
    torch_dtype = DTYPES[dtype]
    if not torch_dtype.is_floating_point or not len(data):
        return True
    return all_finite(torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype))
