"""The compute device: CUDA when present (`auto`), else CPU."""

from __future__ import annotations

import torch

from .errors import DernError, arg
from .options import check_device_name


def resolve_device(name: str) -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DernError(f"{arg('device', name)} asked for CUDA, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DernError(f"{arg('device', name)}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device
