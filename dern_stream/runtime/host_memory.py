"""Keep freed heap memory from piling up in the process (glibc; elsewhere these are no-ops).

Each layer allocates and frees tens of MB in many tensors; glibc keeps freed chunks in its heap, and
the fragments add up layer after layer. `malloc_trim` returns them between layers.

Within a layer, glibc's default *dynamic* mmap threshold moves every freed block of up to 32 MB into
the heaps of the three pipeline threads, where it stays; fixing the threshold at 4 MiB gives such
blocks back on free. What each saves is measured in docs/performance.md, "Memory".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_MMAP_THRESHOLD = 4 * 2**20


@functools.cache
def _glibc_function(name: str):
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        return getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def return_freed_memory() -> None:
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


def map_large_blocks() -> None:
    """Serve allocations of 4 MiB and more from their own mappings, returned to the OS when freed.
    Process-wide and permanent (glibc cannot switch its dynamic threshold back on)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
