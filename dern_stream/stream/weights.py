"""Fill a meta-device module's parameters from checkpoint tensors, and free them again.

On disk every expert has its own tensors; in memory transformers 5 fuses them per layer into
`experts.gate_up_proj` [E, 2h, d] (gate rows, then up rows) and `experts.down_proj` [E, d, h], and
renames Mixtral's `block_sparse_moe` to `mlp`. Other renames, concatenations and splits are the family record's
(memory_names, model_memory_names, memory_concatenations, memory_splits); anything else that does not match is an
error, never a silent skip.
"""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..errors import DernError
from ..families import Family
from ..storage.formats import MXFP4_BLOCKS, MXFP4_GROUP, MXFP4_SCALES, SCALE_SUFFIX
from ..storage.reading import load_weight
from ..storage.tensor_kinds import compressed_parts, compressed_shape, is_mxfp4

_FUSED = {"experts.gate_up_proj": ("gate", "up"), "experts.down_proj": ("down",)}
def _concatenated_parts(name: str, ckpt: Checkpoint, family: Family) -> list[str] | None:
    """The on-disk tensors, in order, that make up the in-memory `name` by concatenation (the family's
    memory_concatenations), or None."""
    if name in ckpt.entries:
        return None
    for suffix, parts in family.memory_concatenations:
        if name.endswith("." + suffix):
            names = [name[:-len(suffix)] + part for part in parts]
            if all(n in ckpt.entries for n in names):
                return names
    return None


def materialise(module: torch.nn.Module, prefix: str, ckpt: Checkpoint, family: Family, layer: int | None,
                device: torch.device) -> int:
    """Allocate `module`'s parameters and persistent buffers on `device` (in the dtypes the skeleton
    gave them) and fill them from `ckpt`.

    `prefix` is the module's in-memory name (e.g. "model.layers.3."); `layer` its decoder index when
    it may hold routed experts. Returns the number of parameter elements materialised.
    """
    kept = _computed_buffers(module)
    module.to_empty(device=device)
    _restore(kept, device)
    params = {id(p) for p in module.parameters()}
    count = 0
    state = module.state_dict(keep_vars=True)
    shapes = {prefix + key: tuple(t.shape) for key, t in state.items()}
    split_sources: dict[str, torch.Tensor] = {}  # (an on-disk tensor split into several: read once for all of them)
    with torch.no_grad():
        for key, target in state.items():
            _fill(target, prefix, key, ckpt, family, layer, shapes, split_sources)
            count += target.numel() if id(target) in params else 0
    return count


def release(module: torch.nn.Module) -> None:
    """Return the module's parameters and persistent buffers to the meta device (frees their memory)."""
    kept = _computed_buffers(module)
    module.to_empty(device="meta")
    _restore(kept, None)


def _computed_buffers(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """The non-persistent buffers under `module` that hold values already (computed once, never stored: Gemma's
    embedding scale beside the embedding's weight), which to_empty would otherwise leave uninitialised."""
    return [(m, name, b) for m in module.modules() for name, b in m._buffers.items()
            if b is not None and name in m._non_persistent_buffers_set and not b.is_meta]


def _restore(kept: list[tuple[torch.nn.Module, str, torch.Tensor]], device: torch.device | None) -> None:
    for m, name, b in kept:
        m._buffers[name] = b.to(device) if device is not None else b


def _fill(target: torch.Tensor, prefix: str, key: str, ckpt: Checkpoint, family: Family, layer: int | None,
          shapes: dict[str, tuple[int, ...]], split_sources: dict[str, torch.Tensor]) -> None:
    for suffix, parts in _FUSED.items():
        if layer is not None and key.endswith(suffix) and family.fused is None:
            _fill_fused(target, ckpt, family, layer, parts, prefix + key)
            return
    parts = _concatenated_parts(prefix + key, ckpt, family)
    split = _split_rows(prefix + key, shapes, ckpt, family, layer)
    if parts is not None:
        name, source = prefix + key, torch.cat([load_weight(ckpt, part) for part in parts])
    elif split is not None:
        name, start, rows, _ = split
        if name not in split_sources:
            split_sources[name] = load_weight(ckpt, name)
        source = split_sources[name][start:start + rows]
    else:
        name = _disk_name(prefix + key, ckpt, family, layer)
        source = load_weight(ckpt, name)
        if _transposed(name, tuple(source.shape), tuple(target.shape), family, layer):
            source = source.transpose(-1, -2)
    if tuple(source.shape) != tuple(target.shape):
        raise DernError(f"{name} has shape {list(source.shape)}, the model built from config.json expects "
                        f"{list(target.shape)}")
    target.copy_(source)


def _transposed(name: str, stored: tuple[int, ...], shape: tuple[int, ...], family: Family, layer: int | None) -> bool:
    """Whether transformers loads the stored fused-expert tensor `name` transposed into `shape` (it does where the
    family's layout allows either orientation and the stored shape is not the in-memory one: FusedExperts)."""
    return (layer is not None and family.fused is not None and family.fused.transposable and stored != shape
            and stored[:-2] + stored[-1:] + stored[-2:-1] == shape and name in family.fused_names(layer)[:2])


def _with_scales(names: set[str], ckpt: Checkpoint) -> set[str]:
    return names | {n + SCALE_SUFFIX for n in names if n + SCALE_SUFFIX in ckpt.entries}


def _split_rows(name: str, shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint, family: Family,
                layer: int | None) -> tuple[str, int, int, int] | None:
    """(on-disk tensor, first row, rows, all parts' rows) of the in-memory `name` that transformers splits from one
    on-disk tensor (the family's memory_splits), each part as many rows as the model gives it (`shapes`: the
    in-memory shapes), or None."""
    if layer is None or name in ckpt.entries:
        return None
    prefix = family.layer_prefix(layer)
    for disk, parts in family.memory_splits:
        for index, part in enumerate(parts):
            if name.startswith(prefix + part):
                suffix = name[len(prefix + part):]
                siblings = [prefix + p + suffix for p in parts]
                if prefix + disk + suffix not in ckpt.entries or any(s not in shapes for s in siblings):
                    return None
                rows = [shapes[s][0] for s in siblings]
                return prefix + disk + suffix, sum(rows[:index]), rows[index], sum(rows)
    return None


def _disk_name(name: str, ckpt: Checkpoint, family: Family, layer: int | None) -> str:
    if name in ckpt.entries or is_mxfp4(ckpt, name) or compressed_parts(ckpt, name) is not None:
        return name
    renamed = family.disk_name(name, layer)
    if renamed in ckpt.entries or compressed_parts(ckpt, renamed) is not None:
        return renamed
    embed = family.embed_name()
    if (name == "lm_head.weight" or name.endswith(".lm_head.weight")) and embed in ckpt.entries:
        return embed  # tied embeddings: no lm_head stored
    raise DernError(f"checkpoint has no tensor {name} (or it is stored under a name this tool does not know)")


def _fill_fused(target: torch.Tensor, ckpt: Checkpoint, family: Family, layer: int, parts: tuple[str, ...],
                name: str) -> None:
    experts = target.shape[0]
    offset = 0
    for part in parts:
        for e in range(experts):
            disk = family.expert_name(layer, e, part)
            if disk not in ckpt.entries and compressed_parts(ckpt, disk) is None:
                raise DernError(f"checkpoint has no tensor {disk} (needed for {name})")
            source = load_weight(ckpt, disk)
            rows = source.shape[0]
            if tuple(source.shape[1:]) != tuple(target.shape[2:]) or offset + rows > target.shape[1]:
                raise DernError(f"{disk} has shape {list(source.shape)}, which does not fit {name} "
                                f"{list(target.shape)}")
            target[e, offset:offset + rows].copy_(source)
        offset += rows
    if offset != target.shape[1]:
        raise DernError(f"{name} {list(target.shape)} is not filled by the experts' {'+'.join(parts)} tensors")


def disk_tensors(name: str, shape: tuple[int, ...], ckpt: Checkpoint, family: Family, layer: int | None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> set[str]:
    """The checkpoint tensors that would fill the in-memory tensor `name` of this shape, checked to
    exist with fitting shapes (the same rules as materialise, without reading data); DernError if not. `shapes`: every
    in-memory tensor's shape (for the tensors transformers splits from one on disk)."""
    for suffix, parts in _FUSED.items():
        if name.endswith(suffix) and family.fused is None and (layer is not None or name not in ckpt.entries):
            return _fused_disk_tensors(name, shape, ckpt, family, layer, parts)
    concatenated = _concatenated_parts(name, ckpt, family)
    if concatenated is not None:
        rows = sum(ckpt.entries[n].shape[0] for n in concatenated)
        if any(tuple(ckpt.entries[n].shape[1:]) != tuple(shape[1:]) for n in concatenated) or rows != shape[0]:
            raise DernError(f"{' + '.join(concatenated)} do not make up {name} {list(shape)}")
        return _with_scales(set(concatenated), ckpt)
    split = _split_rows(name, shapes or {}, ckpt, family, layer)
    if split is not None:
        disk, _, _, parts_rows = split
        stored = ckpt.entries[disk].shape
        if tuple(stored[1:]) != tuple(shape[1:]) or parts_rows != stored[0]:
            raise DernError(f"{disk} {list(stored)} does not split into the tensors transformers makes of it "
                            f"({name} {list(shape)})")
        return _with_scales({disk}, ckpt)
    disk = _disk_name(name, ckpt, family, layer)
    if is_mxfp4(ckpt, disk):
        blocks = ckpt.entries[disk + MXFP4_BLOCKS].shape  # [N, rows, groups, 16] of the transposed [N, cols, rows]
        if (blocks[0], blocks[2] * MXFP4_GROUP, blocks[1]) != shape:
            raise DernError(f"{disk}{MXFP4_BLOCKS} has shape {list(blocks)}, which does not hold {name} {list(shape)}")
        return {disk + MXFP4_BLOCKS, disk + MXFP4_SCALES}
    compressed = compressed_parts(ckpt, disk)
    if compressed is not None:
        return _checked_compressed(ckpt, disk, shape, name)
    if ckpt.entries[disk].shape != shape and not _transposed(disk, ckpt.entries[disk].shape, shape, family, layer):
        raise DernError(f"{disk} has shape {list(ckpt.entries[disk].shape)}, the model built from config.json "
                        f"expects {list(shape)}")
    return _with_scales({disk}, ckpt)


def _checked_compressed(ckpt: Checkpoint, disk: str, shape: tuple[int, ...], name: str) -> set[str]:
    """A compressed-tensors weight's stored tensors, its shape (from their headers) checked against `shape`."""
    found = compressed_shape(ckpt, disk)
    if found is None or found[0] != shape[0] or (len(shape) > 1 and found[1] < shape[-1]):
        raise DernError(f"{disk} (compressed-tensors) has shape {list(found or [])}, which does not hold {name} "
                        f"{list(shape)}")
    return set(compressed_parts(ckpt, disk)[1].values())


def _fused_disk_tensors(name: str, shape: tuple[int, ...], ckpt: Checkpoint, family: Family, layer: int | None,
                        parts: tuple[str, ...]) -> set[str]:
    """disk_tensors for a fused in-memory tensor: each expert's tensors of `parts`, stacked along dim 1. Outside the
    family's decoder layers (Qwen3-Omni-MoE's talker, never run, but checked by verify) they are stored as
    transformers 5 saves experts: `experts.{e}.{gate,up,down}_proj.weight`."""
    names, rows = set(), 0
    for part in parts:
        for e in range(shape[0]):
            disk = family.expert_name(layer, e, part) if layer is not None else \
                f"{name.rsplit('.', 1)[0]}.{e}.{part}_proj.weight"
            entry = ckpt.entries.get(disk)
            stored = entry.shape if entry is not None else compressed_shape(ckpt, disk)
            if stored is None:
                raise DernError(f"checkpoint has no tensor {disk} (needed for {name})")
            if tuple(stored[1:]) != tuple(shape[2:]) and entry is not None:
                raise DernError(f"{disk} has shape {list(stored)}, which does not fit {name} "
                                f"{list(shape)}")
            names |= {disk} if entry is not None else _checked_compressed(ckpt, disk, (stored[0], *shape[2:]), name)
        rows += stored[0]
    if rows != shape[1]:
        raise DernError(f"{name} {list(shape)} is not filled by the experts' {'+'.join(parts)} tensors")
    return _with_scales(names, ckpt)
