"""Argument values checked the same way for the command line and the Python API (no torch: the command line
checks them before anything heavy loads): whole numbers, numbers in a range, choices, sizes, device and dtype
names."""

from __future__ import annotations

import math
import re

from ..errors import DernError, arg

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def whole(name: str, value, minimum: int = 1) -> int:
    """`value` if it is an integer (not a bool) of at least `minimum`, else a one-line DernError naming
    argument `name`."""
    if type(value) is not int or value < minimum:
        raise DernError(f"{arg(name)} must be an integer of at least {minimum}, got {value!r}")
    return value


def number(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """`value` as a float if it is a finite real number (not a bool) in [low, high], else a DernError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f"of at least {low:g}"
        raise DernError(f"{arg(name)} must be a finite number {bounds}, got {value!r}")
    return float(value)


def choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DernError(f"{arg(name)} must be one of {', '.join(choices)}, got {value!r}")
    return value


# Compute dtypes by name (stream.executor.parse_dtype maps them to torch's).
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


# torch's device types (c10::DeviceType): a name among them that is not cpu or cuda is a device this tool cannot use.
_DEVICE_TYPES = ("cpu", "cuda", "mkldnn", "opengl", "opencl", "ideep", "hip", "fpga", "maia", "xla", "vulkan",
                 "metal", "xpu", "mps", "meta", "hpu", "ve", "lazy", "ipu", "mtia", "privateuseone")


def check_dtype_name(name) -> str:
    if not isinstance(name, str):
        raise DernError(f"{arg('dtype')} must be auto, float32, bfloat16 or float16, got {name!r}")
    if name not in DTYPE_NAMES:
        raise DernError(f"{arg('dtype', name)}: use auto, float32, bfloat16 or float16")
    return name


def check_device_name(name) -> str:
    """The syntax of a device name (whether CUDA is there is for device.resolve_device to say)."""
    if not isinstance(name, str):
        raise DernError(f"{arg('device')} must be a device name (auto, cpu, cuda or cuda:N), got {name!r}")
    if name == "auto":
        return name
    match = re.fullmatch(r"([a-z]+)(:\d+)?", name)
    if match is None or match.group(1) not in _DEVICE_TYPES:
        raise DernError(f"{arg('device', name)} is not a device name (use auto, cpu, cuda or cuda:N)")
    if match.group(1) not in ("cpu", "cuda"):
        raise DernError(f"{arg('device', name)}: only cpu and cuda are supported")
    return name


def check_text_options(num_tokens, seq_len, batch_size) -> None:
    """The token budget options of dump and eval."""
    whole("num_tokens", num_tokens)
    whole("seq_len", seq_len, 2)
    whole("batch_size", batch_size)


def format_size(n: float) -> str:
    """Bytes for people, in decimal units as parse_size reads them: 812 B, 1.23 MB, 380 MB, 5.09 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB are binary)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DernError(f"cannot read size {value!r}: use a number with a unit such as 500MB, 2GB or 5GiB")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise DernError(f"cannot read size {value!r}: use a number with a unit such as 500MB, 2GB or 5GiB")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise DernError(f"size must be positive, got {value!r}")
    return size
