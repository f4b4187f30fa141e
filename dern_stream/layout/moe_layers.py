"""Checkpoint layout: check each MoE layer's tensors against the config, and plan the output tensors."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint, TensorSpec
from ..checkpoint.safetensors_format import FLOAT_DTYPES, TensorEntry
from ..errors import DernError
from ..families import PARTS, Family, family_for, require_forward
from ..storage.formats import MXFP4_BLOCKS, MXFP4_GROUP, MXFP4_SCALES, SCALE_SUFFIX, ExpertStorage, scale_shape
from ..storage.tensor_kinds import check_fp8_tensors, is_fp8_scale, is_scaled_fp8
from .compressed_experts import check_stored_form, unquantized_experts
from .fused_tensors import fused_tensors

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MoELayer:
    index: int
    router: TensorEntry
    bias: TensorEntry | None
    dtype: str  # experts' stored dtype
    storage: ExpertStorage = ExpertStorage()
    scale_dtype: str | None = None  # FP8: the block scales' stored dtype
    stored_dtypes: tuple[tuple[str, str], ...] = ()  # compressed-tensors: each stored tensor's dtype, by suffix
    # compressed-tensors: the experts stored unquantized (the config's ignore list or targets leave them out), and
    # their float dtype; in an output layer, the positions made from such experts
    plain: tuple[int, ...] = ()
    plain_dtype: str | None = None

    def tensor_names(self, weight_name: str, expert: int) -> list[str]:
        """The stored tensors of `weight_name` for an expert stored as `expert` of this layer is."""
        return [weight_name] if expert in self.plain else self.storage.tensor_names(weight_name)

    def expert_entry(self, ckpt: Checkpoint, family: Family, expert: int, part: str) -> TensorEntry:
        return ckpt.entries[family.expert_name(self.index, expert, part)]


@dataclass(frozen=True)
class ModelShape:
    num_experts: int
    hidden: int
    intermediate: int


def natural_key(name: str) -> list:
    """model.layers.2 sorts before model.layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def moe_layer_indices(ckpt: Checkpoint, family: Family, below: int | None = None) -> list[int]:
    """Indices of the layers holding routed experts (those below `below`, if given); none is an error."""
    indices = [i for i in family.moe_layers(ckpt.entries) if below is None or i < below]
    if not indices:
        raise DernError(
            f"no MoE layers found: no tensor named like {family.router_name(0)!r}; is this an MoE checkpoint?"
        )
    return indices


def check_decoder_layers(ckpt: Checkpoint) -> None:
    """config.json's layer count and vocabulary against the tensors the shards hold, before any model is
    built from it (a count of 10**9 would otherwise build, and a wrong one drop or invent layers).
    Layers past num_hidden_layers are accepted only as multi-token-prediction layers the config
    declares (DeepSeek-V3's num_nextn_predict_layers)."""
    config = ckpt.config
    family = family_for(config)
    key = family.layers_key
    n = config[key]  # a positive integer: config_check.py
    present = sorted({i for i in map(family.layer_of, ckpt.entries) if i is not None})
    below = [i for i in present if i < n]
    if len(below) < n:
        missing = next(i for i in range(n) if i >= len(below) or below[i] != i)
        raise DernError(f"config.json says {key} {n}, but the shards hold no tensor of layer {missing} "
                        f"(they hold {len(below)} decoder layers)")
    extra = [i for i in present if i >= n]
    predicts = config.get("num_nextn_predict_layers", config.get("num_mtp_layers"))  # (Sarvam's own name for it)
    predicts = predicts if type(predicts) is int and predicts >= 0 else 0
    if extra and extra[-1] >= n + predicts:
        raise DernError(f"the shards hold layer {extra[-1]}, past config.json's {key} {n}"
                        + (f" and its {predicts} prediction layer(s)" if predicts else ""))
    embed_name = family.embed_name()
    embed = ckpt.entries.get(embed_name)
    expected = (config.get("vocab_size"), config.get("hidden_size"))
    if embed is not None and None not in expected and embed.shape != expected:
        raise DernError(f"{embed_name} has shape {list(embed.shape)}, config.json implies "
                        f"[vocab_size {expected[0]}, hidden_size {expected[1]}]")


def check_moe_placement(ckpt: Checkpoint, family: Family) -> None:
    """The decoder layers holding a router are those config.json makes MoE layers (else transformers would
    build a dense MLP where the shards hold experts, or the reverse, and the output could not load)."""
    if family.moe_layer is None:
        return
    n = family.decoder_layers(ckpt.config)
    found = [i for i in family.moe_layers(ckpt.entries) if i < n]
    try:
        expected = [i for i in range(n) if family.moe_layer(ckpt.config, i)]
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise DernError(f"config.json's MoE layer placement cannot be read ({e})") from None
    if found != expected:
        raise DernError(f"config.json makes layers {_show(expected)} MoE layers, but the shards hold routers "
                        f"in layers {_show(found)}")


def _show(layers: list[int]) -> str:
    return str(layers) if len(layers) <= 8 else f"[{', '.join(map(str, layers[:8]))}, ...] ({len(layers)})"


def check_moe_layers(ckpt: Checkpoint, family: Family, shape: ModelShape,
                     storage: ExpertStorage | None = None) -> list[MoELayer]:
    """Every routed-expert tensor present, with the shapes the config implies and one dtype of `storage`
    (FP8: each weight with its block scales)."""
    storage = storage or ExpertStorage()
    check_moe_placement(ckpt, family)
    if family.fused is not None and storage.fp8:
        raise DernError(f"FP8 {family.model_type} checkpoints (fused experts) are not supported yet")
    if storage.mxfp4 and not (family.fused is not None and family.fused.biased):
        raise DernError(f"MXFP4 is gpt-oss's storage; {family.model_type} checkpoints in it are not supported")
    indices = moe_layer_indices(ckpt, family)
    n, d = shape.num_experts, shape.hidden
    rows = n + family.passive_experts(ckpt.config)  # (LongCat-Flash's zero experts' rows follow)
    by_layer: dict[int | None, list[str]] = {}  # (each layer's checks look at its own names only)
    for name in ckpt.entries:
        by_layer.setdefault(family.layer_of(name), []).append(name)
    layers = []
    for i in indices:
        router = ckpt.entries[family.router_name(i)]
        if router.shape != (rows, d):
            zero = f" ({n} routed + {rows - n} zero experts)" if rows > n else ""
            raise DernError(f"layer {i} router has shape {list(router.shape)}, config implies {[rows, d]}{zero}")
        stored_dtypes: tuple[tuple[str, str], ...] = ()
        plain: tuple[tuple[int, ...], str | None] = ((), None)
        if family.fused is not None:
            dtypes, scale_dtypes = _check_fused(ckpt, family, i, shape, storage), set()
        elif storage.compressed is not None:
            stored_dtypes, plain = _check_compressed(ckpt, family, i, shape, storage, by_layer.get(i, []))
            # (a layer the config leaves wholly unquantized has no stored dtype of its own: the format's)
            dtypes = {dict(stored_dtypes).get(storage.compressed.params[0], storage.compressed.stored_dtype())}
            scale_dtypes = set()
        else:
            dtypes, scale_dtypes = _check_per_expert(ckpt, family, i, shape, storage, by_layer.get(i, []))
        allowed = storage.weight_dtypes()
        if len(dtypes) != 1 or not dtypes <= set(allowed):
            raise DernError(f"layer {i} experts are stored as {sorted(dtypes)}; "
                            + (f"config.json's quantization_config needs {allowed[0]}" if storage.quantized
                               else f"supported: one of {', '.join(FLOAT_DTYPES)}, the same for all"))
        if len(scale_dtypes) > 1 or not scale_dtypes <= {"F32", "BF16"}:
            raise DernError(f"layer {i} expert scales are stored as {sorted(scale_dtypes)}; "
                            "supported: F32 or BF16, the same for all")
        bias_name = family.bias_name(i)
        bias = ckpt.entries.get(bias_name) if bias_name else None
        if bias is not None and bias.shape not in ((rows,), (1, rows)):
            raise DernError(f"{bias_name} has shape {list(bias.shape)}, expected {[rows]} (or {[1, rows]})")
        _check_no_unknown_per_expert(ckpt, family, i, n, by_layer.get(i, []))
        router_input_scale(ckpt, family, i)  # (refused before any work where the router's input cannot be had)
        layers.append(MoELayer(i, router, bias, dtypes.pop(), storage, scale_dtypes.pop() if scale_dtypes else None,
                               stored_dtypes, *plain))
    return layers


def router_input_scale(ckpt: Checkpoint, family: Family, index: int) -> torch.Tensor | None:
    """Layer `index`'s Gating.input_scale [d] where its router reads its own normalisation of the input (Gemma 4:
    families/record.RouterInput), else None."""
    if family.router_input is None:
        return None
    scale, norm = family.router_input.names(family.layer_prefix(index))
    missing = [name for name in (scale, norm) if name not in ckpt.entries]
    if missing:
        raise DernError(f"layer {index} has a router but no {missing[0]}, which {family.model_type}'s router reads")
    return family.router_input.vector(ckpt.load(scale), ckpt.load(norm), family.layer_prefix(index))


def _is_shared(name: str) -> bool:
    """A shared expert's tensor (never cut: a width that happens to equal N is no expert dimension)."""
    return any(part.startswith(("shared_expert", "shared_mlp")) for part in name.split("."))


def _check_no_unknown_per_expert(ckpt: Checkpoint, family: Family, i: int, n: int, names: list[str]) -> None:
    """A tensor of layer i's MoE block with one entry per expert that the family does not name (a router bias
    Mixtral has no use for, say) cannot be cut to K experts as the rest of the layer is: refused, not copied whole
    beside a K-row router."""
    block = f"{family.layer_prefix(i)}{family.router.split('.')[0]}."
    known = {family.router_name(i), family.bias_name(i),
             *(family.router_input.names(family.layer_prefix(i)) if family.router_input else ())}
    for name in names:
        entry = ckpt.entries[name]
        if (name.startswith(block) and name not in known and n in entry.shape and not _is_shared(name)
                and not family.is_layer_expert_tensor(i, name) and not is_fp8_scale(ckpt, name)):
            raise DernError(f"{name} {list(entry.shape)} has one entry per expert, but {family.model_type} has no "
                            f"such tensor, so it cannot be cut to fewer experts with the rest of the layer: remove it "
                            "from the checkpoint to rewrite it")


def _check_per_expert(ckpt: Checkpoint, family: Family, i: int, shape: ModelShape, storage: ExpertStorage,
                      names: list[str]) -> tuple[set[str], set[str]]:
    """A layer's per-expert tensors (and FP8 scales): all there, nothing else, shapes as the config implies.
    Returns the weights' and the scales' dtypes."""
    n, d, h = shape.num_experts, shape.hidden, shape.intermediate
    expected_shape = {"gate": (h, d), "up": (h, d), "down": (d, h)}
    expected = {family.expert_name(i, e, p): p for e in range(n) for p in PARTS}
    scales = {name + SCALE_SUFFIX: p for name, p in expected.items()} if storage.fp8 else {}
    _check_expert_names(family, i, names, {*expected, *scales},
                        lambda extra: " (config.json declares no quantization_config)"
                        if extra.endswith(SCALE_SUFFIX) and not storage.fp8 else "",
                        f"config says {n} experts" + (f", FP8 with {list(storage.block)} block scales"
                                                      if storage.fp8 else ""))
    dtypes, scale_dtypes = set(), set()
    for name, p in expected.items():
        entry = ckpt.entries[name]
        if entry.shape != expected_shape[p]:
            raise DernError(f"{name} has shape {list(entry.shape)}, config implies {list(expected_shape[p])}")
        dtypes.add(entry.dtype)
    for name, p in scales.items():
        entry, grid = ckpt.entries[name], scale_shape(expected_shape[p], storage.block)
        if entry.shape != grid:
            raise DernError(f"{name} has shape {list(entry.shape)}; {list(storage.block)} blocks of "
                            f"{list(expected_shape[p])} need {list(grid)}")
        scale_dtypes.add(entry.dtype)
    return dtypes, scale_dtypes


def _check_expert_names(family: Family, i: int, names: list[str], expected: set[str], extra_note, why: str) -> None:
    """Layer i's expert tensors among `names` are exactly `expected`: the first other one is refused (with
    `extra_note(name)`), then the first missing one (with `why`, what the config implies)."""
    present = {name for name in names if family.is_layer_expert_tensor(i, name)}
    if present - expected:
        extra = min(present - expected, key=natural_key)
        raise DernError(f"layer {i} has an expert tensor this tool does not handle: {extra}{extra_note(extra)}")
    if expected - present:
        raise DernError(f"layer {i} is missing expert tensor {min(expected - present, key=natural_key)} ({why})")


def _check_compressed(ckpt: Checkpoint, family: Family, i: int, shape: ModelShape, storage: ExpertStorage,
                      names: list[str]) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[int, ...], str | None]]:
    """A layer's compressed-tensors experts: each stored as the config says (compressed_experts.py), every quantized
    weight's stored tensors there with the shapes its format gives a weight of the config's shape, every unquantized
    one a plain weight of that shape, nothing else, and one dtype per stored tensor (and one for the plain weights).
    Returns the dtypes by suffix, and the unquantized experts with their dtype."""
    fmt, n, d, h = storage.compressed, shape.num_experts, shape.hidden, shape.intermediate
    plain = unquantized_experts(ckpt.config, family, i, n)
    expected, plain_names = {}, set()
    for e in range(n):
        for part in PARTS:
            weight = family.expert_name(i, e, part)
            rows, cols = (d, h) if part == "down" else (h, d)
            check_stored_form(ckpt, fmt, weight, e in plain)
            if e in plain:
                expected[weight] = (rows, cols)
                plain_names.add(weight)
                continue
            expected.update(zip(fmt.names(weight), fmt.stored_shapes(rows, cols).values(), strict=True))
    _check_expert_names(family, i, names, set(expected), lambda _: f" (config.json declares {fmt.format})",
                        f"config says {n} experts in compressed-tensors {fmt.format}")
    dtypes: dict[str, set[str]] = {p: set() for p in fmt.params} | {"unquantized": set()}
    for name, want in expected.items():
        entry = ckpt.entries[name]
        if entry.shape != want:
            need = "the config implies" if name in plain_names else \
                f"{fmt.format} ({fmt.strategy}) weights of the config's shape need"
            raise DernError(f"{name} has shape {list(entry.shape)}; {need} {list(want)}")
        kind = "unquantized" if name in plain_names else next(p for p in fmt.params if name.endswith("." + p))
        dtypes[kind].add(entry.dtype)
    odd = next((p for p, v in dtypes.items() if len(v) > 1), None)
    if odd is not None:
        raise DernError(f"layer {i} experts' {odd} tensors are stored in several dtypes ({sorted(dtypes[odd])})")
    if not dtypes["unquantized"] <= set(FLOAT_DTYPES):
        raise DernError(f"layer {i}'s unquantized experts are stored as {dtypes['unquantized'].pop()}; supported: one "
                        f"of {', '.join(FLOAT_DTYPES)}")
    plain_dtype = dtypes.pop("unquantized").pop() if plain else None
    return tuple((p, v.pop()) for p, v in dtypes.items() if v), (plain, plain_dtype)


def _check_fused(ckpt: Checkpoint, family: Family, i: int, shape: ModelShape, storage: ExpertStorage) -> set[str]:
    """A fused layer's expert tensors: present, [N, ...] with the slice shapes the config implies (MXFP4:
    bytes); nothing else beside them and the router (an unknown bias or scale would be copied with N rows).
    Returns the float tensors' dtypes."""
    if storage.mxfp4 and (shape.hidden % MXFP4_GROUP or shape.intermediate % MXFP4_GROUP):
        raise DernError(f"MXFP4 experts need hidden_size and {family.intermediate_key} to be multiples of "
                        f"{MXFP4_GROUP}, MXFP4's group; this config has {shape.hidden} and {shape.intermediate}, "
                        "a layout transformers does not load either (padded or not)")
    tensors = fused_tensors(family, i, shape.hidden, shape.intermediate, storage)
    known = {*(t.name for t in tensors), family.router_name(i), family.bias_name(i)}
    module = f"{family.layer_prefix(i)}{family.fused.module}"
    extra = sorted((n for n in ckpt.entries if n.startswith(module) and n not in known), key=natural_key)
    if extra:
        raise DernError(f"layer {i} has an expert tensor this tool does not handle: {extra[0]}"
                        + (" (config.json declares no quantization_config)"
                           if extra[0].endswith((MXFP4_BLOCKS, MXFP4_SCALES, SCALE_SUFFIX)) and not storage.mxfp4
                           else ""))
    dtypes = set()
    for t in tensors:
        entry = ckpt.entries.get(t.name)
        if entry is None:
            raise DernError(f"layer {i} is missing expert tensor {t.name}"
                            + (" (config.json declares MXFP4)" if storage.mxfp4 else ""))
        if entry.shape != t.stored_shape(shape.num_experts):
            raise DernError(f"{t.name} has shape {list(entry.shape)}, config implies "
                            f"{list(t.stored_shape(shape.num_experts))}")
        if t.dtype is not None and entry.dtype != t.dtype:
            raise DernError(f"{t.name} is stored as {entry.dtype}; MXFP4 blocks and scales are {t.dtype}")
        if t.dtype is None:
            dtypes.add(entry.dtype)
    return dtypes


def plan_output(
    ckpt: Checkpoint, family: Family, layers: list[MoELayer], experts: int, intermediate: int,
    dequantized: bool = False,
) -> tuple[list[TensorSpec], list[str]]:
    """Output tensor specs in natural order (a layer's new experts where its router was), and the input
    tensors that are copied (unchanged, or dequantized to bf16 where `dequantized`: their FP8 scales are
    then dropped). `layers` describe the output's experts (output_layers)."""
    by_router = {family.router_name(layer.index): layer for layer in layers}  # by name: entries may compare equal
    biases = {family.bias_name(layer.index) for layer in layers if layer.bias is not None}
    moe_indices = [layer.index for layer in layers]
    rows = experts + family.passive_experts(ckpt.config)  # the kept experts' rows, then the zero experts'
    specs, copied = [], []
    for name in sorted(ckpt.entries, key=natural_key):
        entry = ckpt.entries[name]
        layer_index = family.layer_of(name)
        if layer_index in moe_indices and family.is_layer_expert_tensor(layer_index, name):
            continue
        if (dequantized and is_fp8_scale(ckpt, name)) or family.is_dropped(name):
            continue
        if name in by_router:
            specs.append(TensorSpec(name, entry.dtype, (rows, entry.shape[1])))
            specs += _expert_specs(family, by_router[name], entry.shape[1], experts, intermediate)
        elif name in biases:
            specs.append(TensorSpec(name, entry.dtype, (*entry.shape[:-1], rows)))
        else:
            dtype = "BF16" if dequantized and is_scaled_fp8(ckpt, name) else entry.dtype
            specs.append(TensorSpec(name, dtype, entry.shape))
            copied.append(name)
    return specs, copied


def _expert_specs(family: Family, layer: MoELayer, d: int, experts: int, intermediate: int) -> list[TensorSpec]:
    """One output layer's expert tensor specs, in the order they are written (they follow its router)."""
    if family.fused is not None:
        return [TensorSpec(t.name, t.dtype or layer.dtype, t.stored_shape(experts))
                for t in fused_tensors(family, layer.index, d, intermediate, layer.storage)]
    specs = []
    for e in range(experts):
        for part in PARTS:
            shape = (d, intermediate) if part == "down" else (intermediate, d)
            name = family.expert_name(layer.index, e, part)
            fmt = layer.storage.compressed
            if fmt is not None and e in layer.plain:
                specs.append(TensorSpec(name, layer.plain_dtype, shape))
                continue
            if fmt is not None:
                dtypes = dict(layer.stored_dtypes)
                specs += [TensorSpec(stored, dtypes[suffix], stored_shape) for stored, (suffix, stored_shape) in
                          zip(fmt.names(name), fmt.stored_shapes(*shape).items(), strict=True)]
                continue
            specs.append(TensorSpec(name, layer.dtype, shape))
            if layer.storage.fp8:
                specs.append(TensorSpec(name + SCALE_SUFFIX, layer.scale_dtype,
                                        scale_shape(shape, layer.storage.block)))
    return specs


def output_layers(layers: list[MoELayer], dequantized: bool, kept: dict[int, list[int] | None] | None = None,
                  experts: int = 0, num_experts: int = 0) -> list[MoELayer]:
    """How the output stores each layer's experts: as the input, or dequantized to bf16. compressed-tensors: each of
    the `experts` output experts (of the input's `num_experts`) in the form of the input expert it is made from
    (kept[layer], the plan's choice)."""
    if dequantized:
        return [replace(layer, dtype="BF16", storage=ExpertStorage(), scale_dtype=None, plain=(), plain_dtype=None)
                for layer in layers]
    return [replace(layer, plain=_plain_positions(layer, (kept or {}).get(layer.index), experts, num_experts))
            if layer.plain else layer for layer in layers]


def _plain_positions(layer: MoELayer, kept: list[int] | None, experts: int, num_experts: int) -> tuple[int, ...]:
    """The output positions of `layer` made from unquantized experts. The plan lays out every tensor before the layer
    runs, so a method that chooses its experts as it runs (kept None) can rewrite only a layer in one form."""
    if kept is not None:
        return tuple(j for j, e in enumerate(kept) if e in layer.plain)
    if len(layer.plain) == num_experts:  # (every expert unquantized)
        return tuple(range(experts))
    raise DernError(f"layer {layer.index} holds both quantized and unquantized experts (compressed-tensors' ignore "
                    "list), and this method chooses the experts it keeps as the layer runs, after the output's layout "
                    "is fixed: use a method that ranks them first (dern, prune)")


def check_plan_complete(specs: list[TensorSpec], writes: dict[int, list[str]]) -> None:
    """Every planned output tensor is written by exactly one layer's write step, before any work starts
    (a gap would otherwise show only at the end, as an output that cannot be finished)."""
    planned = Counter(spec.name for spec in specs)
    written = Counter(name for names in writes.values() for name in names)
    if written != planned or max(planned.values(), default=1) > 1:
        odd = sorted((planned - written) + (written - planned) + Counter(n for n, c in planned.items() if c > 1))
        raise DernError(f"internal error: the output plan and the layer writes disagree (e.g. {odd[0]}); "
                        "nothing was written")


def copies_by_layer(names: list[str], moe_layers: list[int], family: Family) -> dict[int, list[str]]:
    """Untouched tensors grouped with the MoE layer whose write copies them: a decoder layer's own
    tensors with the first MoE layer at or after it (the last, past the end), others with the first."""
    groups: dict[int, list[str]] = {i: [] for i in moe_layers}
    for name in names:
        layer = family.layer_of(name)
        later = [i for i in moe_layers if layer is not None and i >= layer]
        groups[later[0] if later else (moe_layers[-1] if layer is not None else moe_layers[0])].append(name)
    return groups


def check_forward_model(ckpt: Checkpoint) -> Family:
    """A checkpoint checked for the streamed forward of dump and eval (its family, FP8 scales, decoder layers), from
    its config.json and headers alone: the command line runs this before torch loads, the commands again."""
    family = family_for(ckpt.config)
    require_forward(family)
    check_fp8_tensors(ckpt)
    check_decoder_layers(ckpt)
    return family
