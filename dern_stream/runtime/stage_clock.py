"""Seconds spent per stage of the rewrite (read, importance, reassign, cluster, fit, write).

Stages run on three threads at once (pipeline.py), or in several workers, so their sum exceeds the wall time; the
breakdown says which stage bounds the run. On CUDA a stage ends with a synchronize, or the
asynchronous kernels would be billed to whichever stage happens to wait for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STAGES = ("read", "importance", "reassign", "cluster", "fit", "write")


class StageClock:
    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()
        self._sync = device is not None and device.type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


    def add(self, seconds: dict[str, float]) -> None:
        """Seconds timed elsewhere (a worker process, the plan's ranking)."""
        with self._lock:
            for stage, value in seconds.items():
                self.seconds[stage] = self.seconds.get(stage, 0.0) + value


NO_CLOCK = StageClock()  # the default for callers that do not time (tests, library use of single stages)
