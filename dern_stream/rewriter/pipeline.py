"""Three threads over the MoE layers: read layer L+1 while layer L is computed and layer L-1 is written.

Bounded by semaphores, not only by queue sizes, so memory stays at a fixed number of layers: the
reader may start layer L+1 only once layer L-1's inputs are released, and the computation may
hand over layer L's result only once layer L-1's has been written. Host memory therefore holds at
most: what `read` returned for the next layer, the layer being computed, and the result being
written. (The rewrite's `read` brings the layer's bytes into the page cache and returns only its
router, with a future for its routing statistics, which a fourth thread computes from the dump;
so the process holds one layer of experts: api.rewrite.)
Reading (pread) and writing (pwrite) release the GIL, and so do torch's kernels,
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
    _Pipeline(ahead).run(items, read, compute, write)


class _Pipeline:
    """The threads' shared state: a stop flag, the first failure, the slots that bound memory and the queues."""

    def __init__(self, ahead: int) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        # A read slot covers a layer from the start of its read to the end of its computation.
        self.read_slots, self.write_slots = threading.Semaphore(ahead + 1), threading.Semaphore(ahead)
        self.loaded: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()

    def run(self, items: Iterable[I], read: Callable[[I], L], compute: Callable[[L], R],
            write: Callable[[R], None]) -> None:
        threads = [threading.Thread(target=self._guarded(body), name=f"dern-{name}", daemon=True)
                   for name, body in (("reader", lambda: self._reader(items, read)),
                                      ("writer", lambda: self._writer(write)))]
        for t in threads:
            t.start()
        try:
            self._compute(compute)
            threads[1].join()
        except _Stopped:
            pass
        except BaseException:
            # Results computed before the failure are still written: a resumed run keeps them.
            self.results.put(_DONE)
            threads[1].join()
            raise
        finally:
            self.stop.set()  # a worker still blocked (after a failure here) exits
            for t in threads:
                t.join()
        if self.errors:
            raise self.errors[0]

    def _compute(self, compute: Callable[[L], R]) -> None:
        while (inputs := self._get(self.loaded)) is not _DONE:
            result = compute(inputs)
            del inputs  # this layer's weights go before the reader may take the next-but-one
            self.read_slots.release()
            self._acquire(self.write_slots)
            self.results.put(result)
            del result
        self.results.put(_DONE)

    def _reader(self, items: Iterable[I], read: Callable[[I], L]) -> None:
        for item in items:
            self._acquire(self.read_slots)
            self.loaded.put(read(item))
        self.loaded.put(_DONE)

    def _writer(self, write: Callable[[R], None]) -> None:
        while (result := self._get(self.results)) is not _DONE:
            write(result)
            del result  # the written layer's memory goes before the next one is taken
            self.write_slots.release()

    def _acquire(self, slots: threading.Semaphore) -> None:
        while not slots.acquire(timeout=0.1):
            if self.stop.is_set():
                raise _Stopped

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

    def _guarded(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                self.errors.append(e)
                self.stop.set()
        return run
