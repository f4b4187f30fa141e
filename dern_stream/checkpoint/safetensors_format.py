"""The safetensors container format: header parsing (validated) and header building.

The safetensors library reads tensors; it does not expose byte offsets, nor write a file
tensor by tensor. Both are needed here: offsets let untouched tensors be copied as raw
bytes, and a header built in advance lets output be written in place as each layer is done.
Format: 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import DernError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lives: its file, dtype, shape and absolute byte range in the file."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check one .safetensors file's header; every problem becomes a one-line DernError."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DernError(f"{name} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise DernError(f"{name} has a corrupt safetensors header (declared length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise DernError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise DernError(f"{name} has a corrupt safetensors header (not a JSON object)") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for tname, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            # JSON numbers must be plain non-negative integers (not 2.5, inf, or true).
            ok = dtype in DTYPES and all(type(v) is int and v >= 0 for v in (*shape, begin, end)) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise DernError(f"{name} has a corrupt safetensors header (bad entry for {tname!r})")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype_size(dtype):
            raise DernError(f"{name}: tensor {tname!r} byte range does not match its shape {list(shape)}")
        if base + end > size:
            raise DernError(f"{name} is truncated: tensor {tname!r} ends past the end of the file")
        entries[tname] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return entries, metadata


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Header bytes for tensors laid out contiguously in the given order, and each tensor's data offset."""
    layout: dict = {"__metadata__": metadata}
    offsets, pos = [], 0
    for name, dtype, shape in tensors:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype_size(dtype)
        layout[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    body = json.dumps(layout, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the data buffer starts 8-byte aligned, as the library writes it
    head = struct.pack("<Q", len(body)) + body
    return head, [len(head) + o for o in offsets]
