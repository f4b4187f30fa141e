"""The rewrite's checks of its options against each other, the calibration dump and the model: the ones that
need no tensors run in the command line before torch loads; the plan runs them all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..calib.dump_files import check_dump_path
from ..errors import DernError, arg

if TYPE_CHECKING:
    from ..families import Family
    from ..layout.moe_layers import ModelShape
    from ..options import RewriteOptions
    from ..storage import ExpertStorage


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
    if storage.mxfp4 and not dequantized and width is not None and width % 32:
        raise DernError(f"{arg('intermediate_size', width)} is not a multiple of 32, MXFP4's group size: use one, "
                        f"or {arg('output_dtype', 'bf16')}")
