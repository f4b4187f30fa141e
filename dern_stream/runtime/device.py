"""The compute device: CUDA when present (`auto`), else CPU."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from ..errors import DernError, arg
from .arguments import check_device_name


def resolve_device(name: str) -> torch.device:
    check_device_name(name)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DernError(f"{arg('device', name)} asked for CUDA, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DernError(f"{arg('device', name)}: only {torch.cuda.device_count()} CUDA device(s) present")
        _start_cuda(device, name)
    return device


def _start_cuda(device: torch.device, name: str) -> None:
    """Start CUDA now, so that a device that cannot start (busy, in exclusive use, or out of file descriptors
    under a low `ulimit -n`) is one line here, not a traceback from the first kernel."""
    try:
        torch.empty(1, device=device)
    except RuntimeError as e:  # torch.AcceleratorError is a RuntimeError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DernError(f"{arg('device', name)}: the CUDA device could not be started ({reason}); "
                        f"pass {arg('device', 'cpu')} to compute on the CPU") from None


def device_name(device: torch.device | None) -> str | None:
    """What computes: the GPU's model on CUDA, else the CPU's architecture."""
    if device is None:
        return None
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.machine()


# A container's memory limit (cgroup v2, then v1; "max" or a huge number where there is none).
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_size(device: torch.device) -> int | None:
    """Bytes of memory the computation on `device` can use at most: the GPU's, or the machine's RAM or the
    container's limit if lower (None where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    sizes = []
    with suppress(ValueError, OSError, AttributeError):  # not POSIX
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    return min(sizes, default=None)


@contextmanager
def deterministic_kernels(device: torch.device | str) -> Iterator[None]:
    """On CUDA, torch's deterministic kernels while the block runs, so that two runs (a resumed one, another
    worker) write the same bytes: without them index_add_, which the importance, the k-means sums and the
    routed outputs use, adds with atomics in whatever order the threads arrive. Ops with no deterministic
    version warn rather than fail. cuBLAS is deterministic on one stream with a fixed workspace, which
    CUBLAS_WORKSPACE_CONFIG sets (torch asks for it; a value the user set is kept). On the CPU nothing changes."""
    name = str(device)  # (a name not yet checked: resolve_device says what is wrong with it)
    cuda = name.split(":")[0] == "cuda" or (name == "auto" and torch.cuda.is_available())
    if not cuda:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not before[0]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
