"""Integrity of stored bytes: checksums of what is written, and whether float values are finite.

The checksum is xxHash's XXH3-128 (the `xxhash` package): measured 3.9 GB/s on one core here against
0.45 GB/s for hashlib's blake2b and 1.0 GB/s for sha256 (README, "Output"), so hashing every byte
the rewrite writes costs a fraction of writing it. It detects accidental change (a flipped bit, a
torn or swapped write), not deliberate tampering.
"""

from __future__ import annotations

import torch
import xxhash

from .safetensors_format import DTYPES

CHECKSUM = "xxh3_128"


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def checksum(data) -> str:
    """Checksum of a bytes-like object."""
    return xxhash.xxh3_128(data).hexdigest()


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating-point tensor (always True for other dtypes). One pass, no
    tensor-sized mask: min and max are NaN if any value is, and infinite if any value is."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: no min/max kernels; float16 holds every float8 value exactly
        t = t.to(torch.float16)
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def bytes_finite(data: memoryview, dtype: str) -> bool:
    """all_finite of raw stored bytes of safetensors dtype `dtype` (a whole number of elements)."""
    torch_dtype = DTYPES[dtype]
    if not torch_dtype.is_floating_point or not len(data):
        return True
    return all_finite(torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype))
