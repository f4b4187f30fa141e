"""Corrupt safetensors headers: every input gives entries or a DernError, never another exception,
and read_header accepts what the safetensors library accepts (see below)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from dern_stream.checkpoint.safetensors_format import read_header
from dern_stream.errors import DernError

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "I8", "X9", 3]),
    "shape": st.lists(st.integers(-2, 4), max_size=3) | _json,
    "data_offsets": st.lists(st.integers(-5, 64), min_size=0, max_size=3) | _json,
})


def _file(tmp_path_factory, payload: bytes):
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(payload)
    return str(path)


def _check(path: str) -> None:
    try:
        entries, _ = read_header(path)
    except DernError as e:
        assert str(e) and "\n" not in str(e)
        return
    for entry in entries.values():
        assert 0 <= entry.start <= entry.end


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_arbitrary_bytes(tmp_path_factory, data):
    _check(_file(tmp_path_factory, data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=6), _entry | _json, max_size=4), st.binary(max_size=64))
def test_structured_headers(tmp_path_factory, header, body):
    raw = json.dumps(header).encode()
    _check(_file(tmp_path_factory, struct.pack("<Q", len(raw)) + raw + body))


# read_header accepts a file exactly when the safetensors library (safe_open) does, bar the forms in
# test_forms_no_writer_produces_are_refused, and then finds every tensor at the bytes the library reads.

_SIZES = {"F32": 4, "BF16": 2, "I8": 1, "F64": 8, "BOOL": 1}


def _library(path: str) -> dict[str, bytes] | None:
    """Each tensor's bytes as safe_open reads them, or None where it refuses the file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()}  # noqa: SIM118
    except SafetensorError:
        return None


def _ours(path: str) -> dict[str, bytes] | str:
    """Each tensor's bytes at the range read_header gives, or its one-line message."""
    try:
        entries, _ = read_header(path)
    except DernError as e:
        assert str(e) and "\n" not in str(e)
        return str(e)
    data = Path(path).read_bytes()
    return {k: data[e.start:e.end] for k, e in entries.items()}


def _agree(path: str) -> None:
    ours, theirs = _ours(path), _library(path)
    if theirs is None:
        assert isinstance(ours, str), "read_header accepts a file the safetensors library refuses"
    else:
        assert ours == theirs


@st.composite
def _layouts(draw):
    """A header whose byte ranges mostly follow on from 0, else start anywhere (overlapping, leaving
    gaps, not starting at 0), listed in shuffled order, and a data buffer about as long as they need."""
    names = draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=4))
    ranges, pos = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(_SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        begin = draw(st.sampled_from([pos, pos, pos, None]))
        begin = draw(st.integers(0, 24)) if begin is None else begin
        end = begin + math.prod(shape) * _SIZES[dtype]
        ranges[name], pos = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}, max(pos, end)
    header = {name: ranges[name] for name in draw(st.permutations(names))}
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(0, 2),
                                                max_size=2))
    if metadata is not None:
        header["__metadata__"] = metadata
    extra = draw(st.sampled_from([0, 0, 0, None]))  # bytes after the last tensor (or missing, if < 0)
    extra = draw(st.integers(-3, 3)) if extra is None else extra
    return header, draw(st.integers(0, 7)), max(0, pos + extra)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_layouts())
def test_offsets_agree_with_the_library(tmp_path_factory, layout):
    header, pad, length = layout
    raw = json.dumps(header).encode() + b" " * pad  # the library pads its headers with spaces
    _agree(_file(tmp_path_factory, struct.pack("<Q", len(raw)) + raw + bytes(i % 251 for i in range(length))))


def _f32(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


CORRUPT = "x.safetensors has a corrupt safetensors header: "


@pytest.mark.parametrize(("header", "length", "message"), [
    ({"a": _f32(0, 16), "b": _f32(8, 24)}, 24, "tensors 'a' and 'b' overlap (bytes 0-16 and 8-24)"),
    ({"b": _f32(0, 8), "a": _f32(0, 8)}, 8, "tensors 'a' and 'b' overlap (bytes 0-8 and 0-8)"),
    ({"a": _f32(0, 8), "b": _f32(16, 24)}, 24, "bytes 8-16 between tensors 'a' and 'b' belong to no tensor"),
    ({"a": _f32(8, 16)}, 16, "the data starts at byte 8, not 0 (tensor 'a' is first)"),
    ({"a": _f32(0, 8)}, 12, "4 bytes after the last tensor; the safetensors library refuses such a file"),
    ({}, 3, "3 bytes after a header that lists no tensors; the safetensors library refuses such a file"),
    ({"__metadata__": {"format": 1}, "a": _f32(0, 8)}, 8, "__metadata__ value for 'format' is not a string"),
    ({"__metadata__": [], "a": _f32(0, 8)}, 8, "__metadata__ is not a JSON object"),
])
def test_layouts_the_library_refuses(tmp_path, header, length, message):
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(length))
    with pytest.raises(DernError) as info:
        read_header(str(path))
    assert str(info.value) == CORRUPT + message
    assert _library(str(path)) is None


# "@" stands for a good entry's fields; each file has 8 bytes of data.
_GOOD = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'


@pytest.mark.parametrize(("raw", "accepted"), [
    ('{"a":{"x":NaN,@}}', False),
    ('{"a":{"x":-Infinity,@}}', False),
    ('{"a":{"x":1e400,@}}', False),
    ('{"a":{"x":' + "9" * 400 + ',@}}', False),
    ('{"a":{"x":[-0,1.5,' + str(2**70) + '],@}}', True),
    ('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]},"b":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}}',
     False),
    ('{"a":{"dtype":"F32","shape":[' + str(2**64) + ',0],"data_offsets":[0,0]},"b":{@}}', False),
    ('{"a":{"dtype":"F32","shape":[' + f"{2**40},{2**40}" + ',0],"data_offsets":[0,0]},"b":{@}}', False),
    ('{"a":{"dtype":"F32","shape":[0,' + f"{2**40},{2**40}" + '],"data_offsets":[0,0]},"b":{@}}', True),
    ('{"a":{"dtype":"F32","shape":"","data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
     False),
    ('{"\\ud800":{@}}', False),
    ('{"\\ud83d\\ude00":{@}}', True),
    ('{"a":{"dtype":"F32",@}}', False),
    ('{"__metadata__":{},"__metadata__":{},"a":{@}}', False),
    ('{"__metadata__":null,"a":{"x":1,"y":[],@},"b":{"dtype":"I8","shape":[0],"data_offsets":[8,8]}}', True),
    ('{"a":{@},"b":{},"b":{"dtype":"I8","shape":[0],"data_offsets":[8,8]}}', False),
    ('{"a":{"x":' + "[" * 125 + "]" * 125 + ',@}}', True),
    ('{"a":{"x":' + "[" * 126 + "]" * 126 + ',@}}', False),
    ('{"a":{"x":' + "[" * 5000 + "]" * 5000 + ',@}}', False),
    ('{"a":{@},"z":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]},"e":{"dtype":"U8","shape":[0],'
     '"data_offsets":[8,8]}}', True),
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_json_the_library_refuses(tmp_path, raw, accepted):
    path = tmp_path / "x.safetensors"
    raw = raw.replace("@", _GOOD)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + bytes(8))
    assert (_library(str(path)) is not None) == accepted
    _agree(str(path))


@pytest.mark.parametrize(("raw", "message"), [
    ('{"a":["F32",[2],[0,8]]}', "x.safetensors has a corrupt safetensors header (bad entry for 'a')"),
    ('{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}',
     "x.safetensors has a corrupt safetensors header (bad entry for 'a')"),
    ('{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}',
     "x.safetensors: tensor 'a' has dtype C64, which dern-stream does not support"),
    ('{"a":{"x":1,"x":2,"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
     "x.safetensors has a corrupt safetensors header (key 'x' is repeated)"),
])
def test_forms_no_writer_produces_are_refused(tmp_path, raw, message):
    """The library reads these too; refusing them keeps the rewrite to what it can write back."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + bytes(8))
    with pytest.raises(DernError) as info:
        read_header(str(path))
    assert str(info.value) == message
