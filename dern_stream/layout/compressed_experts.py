"""compressed-tensors routed experts against config.json's quantization_config: which experts of a layer it quantizes
(its targets minus its ignore list, matched as the library matches them), whether the shards store each as it says,
and the quantization_config of an output that keeps some of them, renumbered (docs/formats.md, "compressed-tensors
checkpoints")."""

from __future__ import annotations

import copy

from ..checkpoint import Checkpoint
from ..checkpoint.safetensors_format import FLOAT_DTYPES
from ..errors import DernError
from ..families import PARTS, Family
from ..storage.compressed_targets import carried_entries, quantized
from ..storage.formats import COMPRESSED_TENSORS, CompressedWeights

_WHAT = f"config.json's quantization_config ({COMPRESSED_TENSORS})"


def module_of(weight: str) -> str:
    """The module a weight belongs to, as quantization_config names it (`...experts.3.down_proj`)."""
    return weight.removesuffix(".weight")


def _group_and_ignore(config: dict) -> tuple[dict, list[str], list[str]]:
    """The config's one group (formats.compressed_weights checked there is one), its targets and the ignore list."""
    q = config["quantization_config"]
    group = next(iter(q["config_groups"].values()))
    targets, ignore = group.get("targets") or [], q.get("ignore") or []
    if not (isinstance(targets, list) and isinstance(ignore, list)
            and all(isinstance(t, str) for t in [*targets, *ignore])):
        raise DernError(f"{_WHAT}: targets and ignore must be lists of module names, 're:' regexes or class names")
    return group, targets, ignore


def unquantized_experts(config: dict, family: Family, layer: int, experts: int) -> tuple[int, ...]:
    """The experts of `layer` that the config leaves unquantized (no target matches them, or an ignore entry does). An
    expert quantized in part is refused: its projections would need two forms in one expert."""
    _, targets, ignore = _group_and_ignore(config)
    modules = [module_of(family.expert_name(layer, e, part)) for e in range(experts) for part in PARTS]
    done = quantized(targets, ignore, modules)
    plain = []
    for e in range(experts):
        own = modules[e * len(PARTS):(e + 1) * len(PARTS)]
        left = [m for m in own if m not in done]
        if left and len(left) < len(own):
            done_here = [m.rpartition(".")[2] for m in own if m in done]
            raise DernError(f"{_WHAT} leaves {left[0]} unquantized but quantizes its expert's "
                            f"{' and '.join(done_here)}: an expert quantized in part is not supported (quantize or "
                            "ignore all of its projections)")
        if left:
            plain.append(e)
    return tuple(plain)


def check_stored_form(ckpt: Checkpoint, fmt: CompressedWeights, weight: str, plain: bool) -> None:
    """The shards store expert weight `weight` as the config says: a plain float `weight` where it leaves the module
    unquantized, the format's tensors where it quantizes it; else one line naming the tensor. (A weight with neither
    is missing: the caller's name check says so.)"""
    quantized_only = [t for t in fmt.names(weight) if t != weight and t in ckpt.entries]
    if plain and quantized_only:
        raise DernError(f"{quantized_only[0]} is stored quantized, but {_WHAT} leaves {module_of(weight)} unquantized "
                        "(its ignore list or targets)")
    if not plain and not quantized_only and weight in ckpt.entries and ckpt.entries[weight].dtype in FLOAT_DTYPES:
        raise DernError(f"{weight} is stored unquantized ({ckpt.entries[weight].dtype}), but {_WHAT} quantizes "
                        f"{module_of(weight)} (its targets and ignore list)")


def output_quantization_config(ckpt: Checkpoint, family: Family, layers: list[int], experts: int,
                               kept: dict[int, list[int] | None]) -> dict:
    """The input's quantization_config with its ignore list and its group's targets carried over to the output, whose
    layer i holds the input's experts kept[i] as 0..K-1 (storage/compressed_targets.carried_entries). A layer whose
    experts are chosen as it runs (kept None) has them all in one form (output_layers refuses it otherwise): its
    first K are named for it, which the config says of alike."""
    n = family.num_experts(ckpt.config)
    sources, dropped = {}, []
    for i in layers:
        chosen = kept.get(i) or list(range(experts))
        for j, e in enumerate(chosen):
            sources.update({module_of(family.expert_name(i, j, p)): module_of(family.expert_name(i, e, p))
                            for p in PARTS})
        dropped += [module_of(family.expert_name(i, e, p)) for e in range(n) if e not in chosen for p in PARTS]
    routed = {*sources.values(), *dropped}
    others = list(dict.fromkeys(name.rpartition(".")[0] for name in ckpt.entries if not family.is_dropped(name)))
    others = [m for m in others if m not in routed]
    q = copy.deepcopy(ckpt.config["quantization_config"])
    group, targets, ignore = _group_and_ignore({"quantization_config": q})
    if "targets" in group:
        group["targets"] = carried_entries(targets, sources, dropped, others)
    if q.get("ignore") is not None:
        q["ignore"] = carried_entries(ignore, sources, dropped, others)
    return q
