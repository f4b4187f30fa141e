"""Calibration dumps: the zarr store of MoE-layer inputs that Stage 1 reads."""

from .capture import dump_from_model
from .store import CalibDump, CalibWriter, tensor_sha256

__all__ = ["CalibDump", "CalibWriter", "dump_from_model", "tensor_sha256"]
