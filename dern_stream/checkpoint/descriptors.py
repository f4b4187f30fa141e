"""Open file descriptors, bounded: a large checkpoint has hundreds of shards, and a small
--max-shard-size makes thousands of output shards, against a per-process limit (often 1024, or far
less under a job scheduler)."""

from __future__ import annotations

import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_MOST = 64  # per cache: beyond this, more descriptors buy no speed
_MARGIN = 32  # left for what else the process opens: torch, the dump's files, the journal, pipes


def descriptor_budget(share: float) -> int:
    """How many descriptors one cache may hold: `share` of what the open-file limit leaves free now."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = _MARGIN
    return max(2, min(_MOST, int((soft - in_use - _MARGIN) * share)))


class DescriptorCache:
    """Descriptors by path, opened by `opener` on first use and kept for the next; at most `capacity`
    are open while idle (the least recently used idle one is closed to make room). Thread-safe: a
    descriptor in use by one thread is never closed under it."""

    def __init__(self, opener: Callable[[str], int], capacity: int):
        self._opener, self.capacity = opener, capacity
        self._open: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, users]
        self._lock = threading.Lock()

    @contextmanager
    def use(self, path: str) -> Iterator[int]:
        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                self._shrink(self.capacity - 1)
                entry = self._open[path] = [self._opener(path), 0]
            self._open.move_to_end(path)
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1

    def _shrink(self, size: int) -> None:
        for path in [p for p, (_, users) in self._open.items() if users == 0]:
            if len(self._open) <= size:
                return
            os.close(self._open.pop(path)[0])

    def close(self) -> None:
        """Close every idle descriptor (all of them once no thread reads)."""
        with self._lock:
            self._shrink(0)
