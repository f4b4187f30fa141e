"""How each tensor of a checkpoint is stored, told from the names and headers alone (no torch): FP8 weights and their
block scales, MXFP4 blocks and scales; and the scales checked before any work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DernError
from .formats import MXFP4_BLOCKS, MXFP4_SCALES, SCALE_SUFFIX, CompressedWeights, expert_storage, scale_shape

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


def is_scaled_fp8(ckpt: Checkpoint, name: str) -> bool:
    """An FP8 weight stored with its block scales (`name` + `_scale_inv`)."""
    return ckpt.entries[name].dtype == "F8_E4M3" and name + SCALE_SUFFIX in ckpt.entries


def is_fp8_scale(ckpt: Checkpoint, name: str) -> bool:
    """The block scales of an FP8 weight."""
    return name.endswith(SCALE_SUFFIX) and ckpt.entries.get(name[:-len(SCALE_SUFFIX)]) is not None \
        and is_scaled_fp8(ckpt, name[:-len(SCALE_SUFFIX)])


def is_mxfp4(ckpt: Checkpoint, name: str) -> bool:
    """`name` is stored as MXFP4 `name_blocks` and `name_scales` (gpt-oss's experts)."""
    return name not in ckpt.entries and name + MXFP4_BLOCKS in ckpt.entries and name + MXFP4_SCALES in ckpt.entries


def compressed_parts(ckpt: Checkpoint, name: str) -> tuple[CompressedWeights, dict[str, str]] | None:
    """The compressed-tensors format and stored tensors (by suffix) of weight `name` (`...proj.weight`), or None when
    the checkpoint is not compressed-tensors or stores this weight as it is (a module its `ignore` list names)."""
    if not name.endswith(".weight"):
        return None
    fmt = expert_storage(ckpt.config).compressed
    if fmt is None:
        return None
    names = fmt.names(name)
    if not all(n in ckpt.entries for n in names):
        return None
    return fmt, dict(zip(fmt.params, names, strict=True))


def compressed_shape(ckpt: Checkpoint, name: str) -> tuple[int, int] | None:
    """The [rows, cols] of compressed-tensors weight `name` from its stored tensors' headers (packed channel-wise
    int weights: cols rounded up to a whole 32-bit word, as their headers hold no more), or None."""
    found = compressed_parts(ckpt, name)
    if found is None:
        return None
    fmt, parts = found
    first = ckpt.entries[parts[fmt.params[0]]].shape
    if fmt.params[0] == "weight":
        return first[0], first[1]
    if fmt.strategy == "group":
        return first[0], ckpt.entries[parts["weight_scale"]].shape[1] * fmt.group_size
    return first[0], first[1] * 32 // fmt.num_bits


def check_scales(ckpt: Checkpoint, name: str, block: tuple[int, int]) -> None:
    """An FP8 weight is 2-D with a scale grid of the right shape, or a one-line DernError."""
    weight, scale = ckpt.entries[name], ckpt.entries[name + SCALE_SUFFIX]
    if len(weight.shape) != 2:
        raise DernError(f"{name} is FP8 with block scales but has shape {list(weight.shape)}; expected 2-D")
    if scale.shape != scale_shape(weight.shape, block):
        raise DernError(f"{name}{SCALE_SUFFIX} has shape {list(scale.shape)}; {list(block)} blocks of {name} "
                        f"{list(weight.shape)} need {list(scale_shape(weight.shape, block))}")


def check_fp8_tensors(ckpt: Checkpoint) -> None:
    """Before any work on a block-FP8 checkpoint: every FP8 tensor has its scales, of the right shape."""
    block = expert_storage(ckpt.config).block
    if block is None:
        scaled = next((n for n, e in ckpt.entries.items()
                       if e.dtype.startswith("F8") and n + SCALE_SUFFIX in ckpt.entries), None)
        if scaled is not None:
            raise DernError(f"{scaled} is FP8 with block scales, but config.json has no FP8 quantization_config")
        return
    for name, entry in ckpt.entries.items():
        if entry.dtype.startswith("F8") and entry.dtype != "F8_E4M3":
            raise DernError(f"{name} is stored as {entry.dtype}; config.json's quantization_config declares "
                            "F8_E4M3 weights")
        if entry.dtype.startswith("F8"):
            if name + SCALE_SUFFIX not in ckpt.entries:
                raise DernError(f"{name} is stored as {entry.dtype} without its block scales ({name}{SCALE_SUFFIX})")
            check_scales(ckpt, name, block)
