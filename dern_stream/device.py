"""The compute device: CUDA when present (`auto`), else CPU."""

from __future__ import annotations

import torch

from .errors import DernError, arg


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str):
        raise DernError(f"{arg('device')} must be a device name (auto, cpu, cuda or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DernError(f"{arg('device', name)} is not a device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DernError(f"{arg('device', name)} asked for CUDA, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DernError(f"{arg('device', name)}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise DernError(f"{arg('device', name)}: only cpu and cuda are supported")
    return device
