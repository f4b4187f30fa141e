"""Where the hidden states between decoder layers live: on the compute device when they fit, else in
host memory, else in a memory-mapped scratch file (one entry per batch, updated in place)."""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from pathlib import Path

import torch

from ..errors import DernError
from ..runtime.arguments import format_size

_SHARE = 0.5  # use at most this share of the free memory of a place


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_placement(total_bytes: int, device: torch.device) -> str:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if total_bytes <= _SHARE * free:
            return "device"
    if total_bytes <= _SHARE * available_host_bytes():
        return "host"
    return "disk"


class HiddenStore:
    """Hidden states [batch, seq, hidden] of every batch, in one place chosen by size (see module doc)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                 placement: str | None = None, scratch_dir: str | Path | None = None):
        self.shapes, self.dtype, self.device = shapes, dtype, device
        sizes = [math.prod(s) for s in shapes]
        total = sum(sizes) * torch.empty((), dtype=dtype).element_size()
        self.placement = placement or choose_placement(total, device)
        self._scratch = None
        if self.placement == "disk":
            try:
                # Deleted by close() (or at interpreter exit); it lives next to the output, not in /tmp.
                self._scratch = tempfile.NamedTemporaryFile(prefix="dern-hidden-", dir=scratch_dir)  # noqa: SIM115
                flat = torch.from_file(self._scratch.name, shared=True, size=sum(sizes), dtype=dtype)
            except (OSError, RuntimeError) as e:
                raise DernError(f"cannot create a {format_size(total)} scratch file for hidden states: {e}") from None
            offsets = [0, *itertools.accumulate(sizes)]
            self._items = [flat[offsets[i]:offsets[i + 1]].view(shape) for i, shape in enumerate(shapes)]
        else:
            self._items = [None] * len(shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._items[i].to(self.device, non_blocking=True)

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        value = value.to(self.dtype)
        if self.placement == "disk":
            self._items[i].copy_(value)
        elif self.placement == "host":
            self._items[i] = value.to("cpu")
        else:
            self._items[i] = value

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._items = [None] * len(self.shapes)
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

