"""Corrupt safetensors headers: every input gives entries or a DernError, never another exception."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
