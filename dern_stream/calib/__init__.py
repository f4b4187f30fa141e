"""Calibration dumps: the zarr store of MoE-layer inputs that Stage 1 reads.

The names load their modules on first use (PEP 562): the command line checks a dump's path
(dump_files.py) without loading torch and zarr."""

from __future__ import annotations

from ..runtime.lazy_exports import lazy_exports

_EXPORTS = {
    "dump_from_model": ".capture",
    "CalibDump": ".store", "CalibWriter": ".store", "tensor_sha256": ".store",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
