"""Calibration dumps: the zarr store of MoE-layer inputs that Stage 1 reads.

The names load their modules on first use (PEP 562): the command line checks a dump's path
(dump_files.py) without loading torch and zarr."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "dump_from_model": ".capture",
    "CalibDump": ".store", "CalibWriter": ".store", "tensor_sha256": ".store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dern_stream.calib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
