"""Rewrite options: one validated dataclass shared by the Python API and the CLI."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import DernError

SIM_COMPONENTS = ("gate", "up", "down")
IMPORTANCE_METHODS = ("routing", "router-norm")
_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB are binary)."""
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


def parse_components(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'up,down' -> ('up', 'down') in canonical gate/up/down order."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [str(p) for p in value]
    parts = [p for p in parts if p]
    unknown = sorted(set(parts) - set(SIM_COMPONENTS))
    if unknown or not parts:
        raise DernError(
            f"--sim-components must be a non-empty subset of gate,up,down; got {','.join(parts) or 'nothing'}"
        )
    return tuple(c for c in SIM_COMPONENTS if c in parts)


@dataclass(frozen=True)
class RewriteOptions:
    """Everything that changes the output of a rewrite (recorded in dern_stream.json)."""

    experts: int
    alpha: float = 0.4
    sim_components: tuple[str, ...] = ("up", "down")
    kmeans_iters: int = 20
    intermediate_size: int | None = None
    importance: str = "routing"
    router_transfer: bool = True
    # Not recorded as a method choice: they change speed and layout, not values.
    device: str = "auto"
    max_shard_size: int = 5 * 10**9
    similarity_block_bytes: int = field(default=256 * 2**20, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.experts, int) or self.experts < 1:
            raise DernError(f"--experts must be a positive integer, got {self.experts!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise DernError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.kmeans_iters < 1:
            raise DernError(f"--kmeans-iters must be at least 1, got {self.kmeans_iters}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise DernError(f"--intermediate-size must be a positive integer, got {self.intermediate_size}")
        if self.importance not in IMPORTANCE_METHODS:
            raise DernError(f"--importance must be one of {', '.join(IMPORTANCE_METHODS)}, got {self.importance!r}")
        object.__setattr__(self, "sim_components", parse_components(self.sim_components))
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))

    def method_record(self) -> dict:
        """The options that determine the output tensors' values, for the audit record."""
        rec = asdict(self)
        for key in ("device", "max_shard_size", "similarity_block_bytes"):
            rec.pop(key)
        rec["sim_components"] = list(self.sim_components)
        return rec
