"""The safetensors container format: header parsing (validated) and header building.

The safetensors library reads tensors; it does not expose byte offsets, nor write a file
tensor by tensor. Both are needed here: offsets let untouched tensors be copied as raw
bytes, and a header built in advance lets output be written in place as each layer is done.
Format: 8-byte little-endian header length N, N bytes of JSON, then the data buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..errors import DernError

# Bytes per value of each dtype the tool reads and writes, by its safetensors name.
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64"}
FLOAT_DTYPES = ("F32", "F16", "BF16")
# Dtypes the safetensors library knows that SIZES lacks (no torch dtype, or sub-byte): refused by name.
_UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64")
_MAX_HEADER = 100_000_000  # the safetensors library's own limit (bytes of JSON)
_MAX_DEPTH = 127  # the deepest JSON nesting its parser (serde_json) accepts


def dtype_size(dtype: str) -> int:
    return SIZES[dtype]


def __getattr__(name: str):
    """DTYPES (safetensors name -> torch dtype) and DTYPE_NAMES (its inverse), built when first asked for: the
    header parser, and the command line's checks that use it, need no torch."""
    if name not in ("DTYPES", "DTYPE_NAMES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    dtypes = {key: getattr(torch, value) for key, value in _TORCH_NAMES.items()}
    globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
    return globals()[name]


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


# read_header refuses every header the safetensors library refuses (safetensors/src/tensor.rs:
# read_metadata, Metadata::validate; its JSON parser is serde_json), so that a file the library
# would not load is never rewritten into one it loads. What the library loads is accepted too, but
# for forms no writer produces: a tensor entry written as a JSON array, a dtype as an object, a key
# repeated in one object (serde refuses some repeats, keeps the last of others), and the dtypes in
# _UNSUPPORTED.


class _Refused(ValueError):
    """JSON that Python's json module reads and serde_json refuses (or, for repeated keys, may)."""


def _number(s: str) -> int | float:
    # serde_json reads -0 and integers past 64 bits as floats (so never as a shape or an offset).
    if s != "-0" and s.lstrip("-").isdigit() and -(2**63) <= (v := int(s)) < 2**64:
        return v
    if math.isinf(v := float(s)):
        raise _Refused(f"number {s[:20]} is out of range")
    return v


def _no_constant(s: str) -> float:
    raise _Refused(f"{s} is not JSON")


def _object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        keys = [k for k, _ in pairs]
        raise _Refused(f"key {next(k for k in keys if keys.count(k) > 1)!r} is repeated")
    return obj


def _depth(v: dict | list) -> int:
    """How deeply v nests arrays and objects (1 for one without any inside)."""
    inner = v.values() if isinstance(v, dict) else v
    return 1 + max((_depth(x) for x in inner if isinstance(x, (dict, list))), default=0)


def _strict_json(raw: bytes) -> object:
    try:
        value = json.loads(raw.decode("utf-8"), parse_int=_number, parse_float=_number,
                           parse_constant=_no_constant, object_pairs_hook=_object)
        if isinstance(value, (dict, list)) and _depth(value) > _MAX_DEPTH:
            raise RecursionError
        if b"\\u" in raw:  # Python keeps a lone surrogate a \u escape makes; serde refuses it
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise _Refused(f"nested deeper than {_MAX_DEPTH} levels") from None
    except UnicodeEncodeError:
        raise _Refused("a \\u escape is an unpaired surrogate") from None
    return value


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check one .safetensors file's header; every problem becomes a one-line DernError."""
    name = os.path.basename(path)
    corrupt = f"{name} has a corrupt safetensors header"
    size, n, raw = _read_raw_header(path, name, corrupt)
    header = _parse_header(raw, corrupt)
    metadata = _pop_metadata(header, corrupt)
    base = 8 + n
    entries = {tname: _tensor_entry(path, name, corrupt, tname, info, base, size) for tname, info in header.items()}
    _check_tiling(entries, base, size, corrupt)
    return entries, metadata


def _read_raw_header(path: str, name: str, corrupt: str) -> tuple[int, int, bytes]:
    """The file's size, its declared header length and the header's raw JSON bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DernError(f"{name} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise DernError(f"{corrupt} (declared length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise DernError(f"cannot read {path}: {e.strerror or e}") from None
    return size, n, raw


def _parse_header(raw: bytes, corrupt: str) -> dict:
    """The header's JSON object, read as strictly as the safetensors library reads it."""
    try:
        header = _strict_json(raw)
        if not isinstance(header, dict):
            raise ValueError
    except _Refused as e:
        raise DernError(f"{corrupt} ({e})") from None
    except ValueError:  # also UnicodeDecodeError
        raise DernError(f"{corrupt} (not a JSON object)") from None
    return header


def _pop_metadata(header: dict, corrupt: str) -> dict[str, str]:
    """Remove `__metadata__` from the header and return it, checked to map strings to strings."""
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise DernError(f"{corrupt}: __metadata__ is not a JSON object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise DernError(f"{corrupt}: __metadata__ value for {key!r} is not a string")
    return metadata


def _tensor_entry(path: str, name: str, corrupt: str, tname: str, info: object, base: int, size: int
                  ) -> TensorEntry:
    """One header entry, checked: well formed, a supported dtype, addressable, its byte range its shape's
    size and inside the file."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        begin, end = offsets
        # JSON numbers must be plain non-negative integers (not 2.5, inf, or true).
        ok = (type(shape) is list and type(offsets) is list and (dtype in SIZES or dtype in _UNSUPPORTED)
              and all(type(v) is int and v >= 0 for v in (*shape, begin, end)) and begin <= end)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DernError(f"{corrupt} (bad entry for {tname!r})")
    if dtype in _UNSUPPORTED:
        raise DernError(f"{name}: tensor {tname!r} has dtype {dtype}, which dern-stream does not support")
    numel, overflow = 1, False
    for s in shape:  # the library multiplies in 64 bits and fails at the first overflow
        numel *= s
        overflow |= numel >= 2**64
    nbytes = numel * dtype_size(dtype)
    if overflow or nbytes * 8 >= 2**64:
        raise DernError(f"{corrupt}: tensor {tname!r} shape {shape} is too large to address")
    if end - begin != nbytes:
        raise DernError(f"{name}: tensor {tname!r} byte range does not match its shape {shape}")
    if base + end > size:
        raise DernError(f"{name} is truncated: tensor {tname!r} ends past the end of the file")
    return TensorEntry(path, dtype, tuple(shape), base + begin, base + end)


def _check_tiling(entries: dict[str, TensorEntry], base: int, size: int, corrupt: str) -> None:
    """Ordered by (start, end), the tensors must tile the data: from its byte 0 to the end of the file."""
    pos, prev = 0, None
    for begin, end, tname in sorted((e.start - base, e.end - base, t) for t, e in entries.items()):
        if prev is None and begin != 0:
            raise DernError(f"{corrupt}: the data starts at byte {begin}, not 0 (tensor {tname!r} is first)")
        if begin < pos:
            raise DernError(f"{corrupt}: tensors {prev!r} and {tname!r} overlap "
                            f"(bytes {entries[prev].start - base}-{pos} and {begin}-{end})")
        if begin > pos:
            raise DernError(f"{corrupt}: bytes {pos}-{begin} between tensors {prev!r} and {tname!r} "
                            "belong to no tensor")
        pos, prev = end, tname
    if base + pos != size:
        last = "the last tensor" if entries else "a header that lists no tensors"
        raise DernError(f"{corrupt}: {size - base - pos} bytes after {last}; "
                        "the safetensors library refuses such a file")


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


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for s in self.shape:
            n *= s
        return n
