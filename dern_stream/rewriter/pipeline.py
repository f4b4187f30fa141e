"""Three threads over the MoE layers: read layer L+1 while layer L is computed and layer L-1 is written.

Bounded by semaphores, not only by queue sizes, so memory stays at a fixed number of layers: the
reader may start layer L+1 only once layer L-1's inputs are released, and the computation may
hand over layer L's result only once layer L-1's has been written. Host memory therefore holds at
most: what `read` returned for the next layer, the layer being computed, and the result being
written. (The rewrite's `read` brings the layer's bytes into the page cache and returns only its
router, with a future for its routing statistics, which a fourth thread computes from the dump;
so the process holds one layer of experts: api.rewrite.)
Reading (pread) and writing (pwrite, copy_file_range) release the GIL, and so do torch's kernels,
so the three overlap in practice. The first failure on any thread stops the others and is
raised on the calling thread, with its original type (a DernError stays a one-line message); after
a failure in the computation, the results already handed to the writer are written first.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

I = TypeVar("I")  # noqa: E741 - item
L = TypeVar("L")  # loaded inputs
R = TypeVar("R")  # computed result

_DONE = object()


class _Stopped(Exception):
    """Raised inside a worker when another thread failed: it just exits."""


def run_pipeline(
    items: Iterable[I],
    read: Callable[[I], L],
    compute: Callable[[L], R],
    write: Callable[[R], None],
    *,
    ahead: int = 1,
) -> None:
    """read(item) on a reader thread, compute(loaded) here, write(result) on a writer thread, in order.

    `ahead` is how many layers may be read (or waiting) beyond the one being computed, and how many
    results may be waiting for, or in, the writer."""
    stop = threading.Event()
    errors: list[BaseException] = []
    # A read slot covers a layer from the start of its read to the end of its computation.
    read_slots, write_slots = threading.Semaphore(ahead + 1), threading.Semaphore(ahead)
    loaded: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def acquire(slots: threading.Semaphore) -> None:
        while not slots.acquire(timeout=0.1):
            if stop.is_set():
                raise _Stopped

    def get(q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped from None

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                errors.append(e)
                stop.set()
        return run

    def reader() -> None:
        for item in items:
            acquire(read_slots)
            loaded.put(read(item))
        loaded.put(_DONE)

    def writer() -> None:
        while (result := get(results)) is not _DONE:
            write(result)
            del result  # the written layer's memory goes before the next one is taken
            write_slots.release()

    threads = [threading.Thread(target=guarded(f), name=f"dern-{f.__name__}", daemon=True) for f in (reader, writer)]
    for t in threads:
        t.start()
    try:
        while (inputs := get(loaded)) is not _DONE:
            result = compute(inputs)
            del inputs  # this layer's weights go before the reader may take the next-but-one
            read_slots.release()
            acquire(write_slots)
            results.put(result)
            del result
        results.put(_DONE)
        threads[1].join()
    except _Stopped:
        pass
    except BaseException:
        # Results computed before the failure are still written: a resumed run keeps them.
        results.put(_DONE)
        threads[1].join()
        raise
    finally:
        stop.set()  # a worker still blocked (after a failure here) exits
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
