"""The rewrite's checks of its options against each other, the calibration dump and the model (its config.json and
its shards' headers): none needs torch, so rewrite and plan run them before torch loads, and a refusal answers at
once; the plan runs them again on what it opens."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..calib.dump_files import check_dump_path
from ..errors import DernError, arg
from ..families import Family, family_for
from ..layout.moe_layers import ModelShape, MoELayer, check_decoder_layers, check_moe_layers
from ..storage.formats import ExpertStorage, expert_storage
from ..storage.tensor_kinds import check_fp8_tensors

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..options import RewriteOptions


def check_calib_choice(options, calib: Path | None) -> None:
    """A rewrite's (or plan's) calibration dump against its options (RewriteOptions): needed unless the experts are
    ranked by router norm, which no option reading the layers' inputs goes with; and readable."""
    if options.importance == "router-norm":
        if options.uses_layer_outputs:
            raise DernError(f"{arg('method', options.method)} with these options needs the layers' cached inputs: "
                            f"pass {arg('calib', metavar='DUMP')} instead of {arg('importance', 'router-norm')}")
        if calib is not None:
            raise DernError(f"{arg('importance', 'router-norm')} ignores the calibration dump; pass one or the other")
        return
    if calib is None:
        raise DernError(f"{arg('calib', metavar='DUMP')} is required (a calibration dump of the MoE layers' inputs, "
                        f"docs/formats.md), or pass {arg('importance', 'router-norm')} for the weaker parameter-only "
                        "ranking")
    check_dump_path(calib)


def check_runs_in_one_process(options: RewriteOptions, workers: int, ray: str | None) -> None:
    """The sequential rewrite fits the layers in order: it cannot be shared out to workers or Ray tasks."""
    if options.sequential and (workers != 1 or ray is not None):
        raise DernError(f"{arg('sequential', True)} fits the layers in order, in one process: leave out "
                        f"{arg('workers')} and {arg('ray')}")


def check_widths(options: RewriteOptions, shape: ModelShape, storage: ExpertStorage, family: Family,
                  dequantized: bool) -> None:
    if options.experts > shape.num_experts:
        raise DernError(f"{arg('experts', options.experts)} exceeds the model's {shape.num_experts} experts per layer")
    if options.intermediate_size is not None and options.intermediate_size > shape.intermediate:
        raise DernError(f"{arg('intermediate_size', options.intermediate_size)} exceeds the experts' current "
                        f"{shape.intermediate}; it can only shrink them")
    width = options.intermediate_size
    if storage.fp8 and not dequantized and width is not None and any(width > b and width % b for b in storage.block):
        # Loaders infer the block from the scale grid (transformers) or require whole blocks (vLLM).
        raise DernError(f"{arg('intermediate_size', width)} splits the FP8 scale blocks {list(storage.block)}: use a "
                        f"multiple of {max(storage.block)}, at most {min(storage.block)}, or "
                        f"{arg('output_dtype', 'bf16')}")
    if family.fused is not None and family.fused.biased:
        for name, off in (("refit", False), ("refit_steps", 0)):  # both fit experts without biases
            if getattr(options, name):
                raise DernError(f"{arg(name)} does not model {family.model_type}'s expert biases yet; leave it out "
                                f"({arg('recipe', 'best')} uses it: give {arg(name, off)})")
    if options.refit_router and family.bias_in_logits:
        raise DernError(f"{arg('refit_router')} does not model {family.model_type}'s router bias yet; leave it out "
                        f"({arg('recipe', 'best')} uses it: give {arg('refit_router', False)})")
    fmt = storage.compressed
    if fmt is not None and not dequantized and width is not None:
        unit = fmt.group_size if fmt.strategy == "group" else fmt.block_structure[1] if fmt.strategy == "block" else 1
        if width % unit:
            raise DernError(f"{arg('intermediate_size', width)} is not a multiple of {unit}, the compressed-tensors "
                            f"{fmt.strategy} size of the down projections' columns: use one, or "
                            f"{arg('output_dtype', 'bf16')}")
    if storage.mxfp4 and not dequantized and width is not None and width % 32:
        raise DernError(f"{arg('intermediate_size', width)} is not a multiple of 32, MXFP4's group size: use one, "
                        f"or {arg('output_dtype', 'bf16')}")


def default_for_family(options: RewriteOptions, family: Family) -> RewriteOptions:
    """The default setting on this family: without the down refit where it cannot model the experts."""
    if family.fused is not None and family.fused.biased:
        return options.without_default_refit(f"it does not model {family.model_type}'s expert biases yet")
    return options


def _check_orientation_kept(family: Family, stored: Family, hidden: int, width: int | None) -> None:
    """A width that makes a transposed-as-stored expert tensor square is refused: transformers would read the output's
    square tensor as not transposed (FusedExperts.transposable), so it would not load as the model written."""
    if width is None or stored.fused is family.fused or family.fused is None:
        return
    square = [name for name, flipped, rows in (
        ("gate_up_proj", stored.fused.gate_up_cols != family.fused.gate_up_cols, 2 * width),
        ("down_proj", stored.fused.down_cols != family.fused.down_cols, width)) if flipped and rows == hidden]
    if square:
        raise DernError(f"{arg('intermediate_size', width)} makes the experts' {square[0]} [K, {hidden}, {hidden}], "
                        f"which transformers reads in its own orientation, not the transposed one this checkpoint "
                        "stores: choose another width")


def check_model(ckpt: Checkpoint, source: Path, options: RewriteOptions
                   ) -> tuple[Family, ExpertStorage, ModelShape, list[MoELayer]]:
    """The input's family, storage, shape and MoE layers, each checked against the config and the options."""
    config = ckpt.config
    family = family_for(config)
    storage = expert_storage(config)
    check_fp8_tensors(ckpt)
    dequantized = options.output_dtype is not None
    if dequantized and not storage.quantized:
        raise DernError(f"{arg('output_dtype', options.output_dtype)} writes a quantized checkpoint dequantized; "
                        f"{source} is not quantized (config.json has no quantization_config): leave it out")
    if dequantized and storage.compressed is not None:
        packed = next((n for n in ckpt.entries if n.endswith(".weight_scale")  # (every format stores one)
                       and not family.is_layer_expert_tensor(family.layer_of(n), n)), None)
        if packed is not None:
            raise DernError(f"{arg('output_dtype', options.output_dtype)} dequantizes the experts of a "
                            f"compressed-tensors checkpoint, but {packed[:-len('_scale')]} is compressed too, and "
                            "the other weights are not dequantized yet: leave the option out")
    shape = ModelShape(family.num_experts(config), int(config.get("hidden_size", 0)), family.intermediate_size(config))
    check_widths(options, shape, storage, family, dequantized)
    check_decoder_layers(ckpt)
    stored = family.stored_layout(ckpt.entries, shape.hidden, shape.intermediate)
    _check_orientation_kept(family, stored, shape.hidden, options.intermediate_size)
    family = stored
    layers = check_moe_layers(ckpt, family, shape, storage)
    family.check_expressible(config, options.experts)
    if options.sequential and family.remote_code:
        raise DernError(f"{arg('sequential', True)} runs the model's forward, and transformers has no class for "
                        f"{family.model_type} (it runs as remote code): leave it out")
    return family, storage, shape, layers


def output_config(ckpt: Checkpoint, family: Family, options: RewriteOptions) -> tuple[dict, list[str]]:
    """The output's config.json, and the notes that say what changed beyond the expert count."""
    out_config, notes = family.output_config(ckpt.config, options.experts, options.intermediate_size,
                                             options.groups)
    dropped = [name for name in ckpt.entries if family.is_dropped(name)]
    if dropped:
        notes.append(f"the {len(dropped)} mtp.* tensors (a multi-token-prediction block, which transformers does not "
                     f"load) are not carried over: their routed experts would disagree with K")
    if options.output_dtype is not None:
        del out_config["quantization_config"]
        notes.append(f"quantized weights written as {options.output_dtype}, without their scales and "
                     "quantization_config")
    return out_config, notes
