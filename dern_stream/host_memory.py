"""Give freed heap memory back to the operating system between layers.

Each layer allocates and frees tens of MB in many tensors; glibc keeps freed chunks in its heap, and
the fragments add up layer after layer (measured: +30 MB of resident memory per decoder layer in a
streamed dump, flat once trimmed). `malloc_trim` returns them; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def return_freed_memory() -> None:
    trim = _libc_trim()
    if trim is not None:
        trim(0)
