"""Checksums of what the tool writes, without torch (the `card` command updates dern_stream.json with them).

The checksum is xxHash's XXH3-128 (the `xxhash` package), several times faster than hashlib's blake2b and
sha256 (docs/performance.md, "Checksums and finiteness checks"), so hashing every byte the rewrite writes costs a
fraction of writing it. It detects accidental change (a flipped bit, a torn or swapped write), not deliberate tampering.
"""

from __future__ import annotations

import json

import xxhash

CHECKSUM = "xxh3_128"


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def checksum(data) -> str:
    """Checksum of a bytes-like object."""
    return xxhash.xxh3_128(data).hexdigest()


def record_checksum(record: dict) -> str:
    """Checksum of a record as written, less its own `record_checksum` field: any change of a value found."""
    return checksum(json.dumps({k: v for k, v in record.items() if k != "record_checksum"}, indent=2).encode())


def sealed_record(record: dict) -> bytes:
    """dern_stream.json's bytes: the record with the checksum of its own content (`record_checksum`)."""
    return (json.dumps({**record, "record_checksum": record_checksum(record)}, indent=2) + "\n").encode()
