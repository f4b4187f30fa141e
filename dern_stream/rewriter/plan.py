"""What a rewrite will do, decided before any expert weight is read: the RewritePlan.

Built from the shard headers, config.json, the routers and the calibration dump: every check, the kept
experts of each MoE layer, the tensors copied untouched, the output shards with each tensor's byte
offset, the output config, the notes, the run key a resumed run must match, and the expected cost.
An executor (execute.py) turns it into an output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calib import CalibDump
from ..checkpoint import Checkpoint, TensorSpec, resolve_checkpoint, side_files_size
from ..checkpoint.config_view import file_config
from ..checkpoint.file_names import INDEX_NAME
from ..checkpoint.hub_cache import source_record
from ..checkpoint.run_identity import files_stamp, run_key, tree_stamp
from ..checkpoint.safetensors_format import dtype_size
from ..checkpoint.writer import ShardLayout, layout_shards
from ..errors import DernError
from ..experts.forward import LayerRouting, layer_routing
from ..families import Family, GroupPlan
from ..layout.compressed_experts import output_quantization_config
from ..layout.moe_layers import (
    ModelShape,
    MoELayer,
    check_plan_complete,
    copies_by_layer,
    output_layers,
    plan_output,
)
from ..options import RewriteOptions
from ..runtime.device import device_name, resolve_device
from ..storage import ExpertStorage
from .checks import check_model, output_config
from .estimates import Estimates, estimate, memory_note
from .layer_io import expert_tensor_names, layer_output_names
from .layer_report import ROUTING, LayerSelection
from .selection import select_experts_of_layers

log = logging.getLogger("dern_stream")


@dataclass
class RewritePlan:
    source: Path
    out: Path | None  # None for `dern-stream plan`, which writes nothing
    calib: Path | None
    options: RewriteOptions
    family: Family
    storage: ExpertStorage
    shape: ModelShape
    layers: list[MoELayer]  # the input's MoE layers, in order
    out_layers: list[MoELayer]  # the same, as the output stores them
    selection: dict[int, LayerSelection]
    specs: list[TensorSpec]  # every output tensor, in file order
    shards: list[ShardLayout]
    copy_with: dict[int, list[str]]  # untouched tensors, copied by the write step of this MoE layer
    writes: dict[int, list[str]]  # every output tensor each MoE layer's write step writes
    out_config: dict
    notes: list[str]
    run: dict  # what a resumed run must match (run_identity.run_key)
    fingerprint: str
    device: torch.device
    groups: GroupPlan | None
    routing: LayerRouting
    reads_experts: bool  # whether any expert weight is read for computation
    estimates: Estimates
    side_bytes: int  # tokenizer and other files copied beside the shards
    dump: CalibDump | None  # open, checked against the model
    config: dict  # the input's config.json
    ranking_seconds: float  # spent on Stage 1 (the importance pass over the dump)
    threads: int  # torch threads each layer is computed with, in every executor (the bytes can depend on it)
    origin: dict  # how dern_stream.json names the input (hub.source_record: repo and commit, or directory name)

    @property
    def dequantized(self) -> bool:
        return self.options.output_dtype is not None

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def output_files(self) -> set[str]:
        """The weight files the output will hold: its shards, and their index where there are several."""
        names = {s.file for s in self.shards}
        return names | ({INDEX_NAME} if len(names) > 1 else set())

    @property
    def calibrated(self) -> set[int]:
        """The MoE layers whose cached inputs the dump holds."""
        return {i for i, s in self.selection.items() if s.source == ROUTING}

    def layer(self, index: int) -> MoELayer:
        """The input's MoE layer `index`."""
        return next(layer for layer in self.layers if layer.index == index)

    def open_source(self) -> Checkpoint:
        """The input checkpoint, checked to be the one this plan was made from (its headers' fingerprint)."""
        ckpt = Checkpoint(self.source)
        if ckpt.fingerprint() != self.fingerprint:
            ckpt.release()
            raise DernError(f"{self.source} changed after the plan was made: plan again")
        return ckpt

    def read_ahead(self, layer: MoELayer) -> list[str]:
        """What a layer's work reads from the input: its copied tensors, and its experts when all of them
        will be read (by the computation, or copied because every expert is kept)."""
        names = list(self.copy_with[layer.index])
        if self.reads_experts or self.options.experts == self.shape.num_experts:
            names += expert_tensor_names(self.family, layer, self.shape.num_experts)
        return names


def make_plan(src: str | Path, out: Path | None, options: RewriteOptions, calib: Path | None,
              progress: bool = False, origin: dict | None = None, workers: int = 1) -> RewritePlan:
    """Check everything a rewrite needs and decide what it will do; raises DernError (one line) on bad
    input. Reads no expert weight: headers, config.json, routers (and score-correction biases), the dump.
    `origin`: how the record names the input (default: hub.source_record of the directory). The caller
    (api.py) has checked the options and the dump's path against each other (checks.check_calib_choice)."""
    source = resolve_checkpoint(src)
    with Checkpoint(source) as ckpt:
        return _plan(ckpt, source, out, options, calib, progress, origin or source_record(source), workers)


def _plan(ckpt: Checkpoint, source: Path, out: Path | None, options: RewriteOptions, calib: Path | None,
          progress: bool, origin: dict, workers: int = 1) -> RewritePlan:
    config = ckpt.config
    family, storage, shape, layers = check_model(ckpt, source, options)
    out_config, notes = output_config(ckpt, family, options)
    notes[:0] = options.notes
    groups = family.group_plan(config, options.experts, options.groups)
    routing = layer_routing(family, config, out_config)
    device = resolve_device(options.device)
    dump = _open_dump(calib, options, family, shape, [layer.index for layer in layers], ckpt, notes)
    if options.sequential and dump is not None:
        dump.tokens()  # the sequential forward runs from them: a dump without them fails now, not after ranking
    reads_experts = options.reads_expert_weights(shape.num_experts, shape.intermediate)
    ranking = time.perf_counter()
    selection = select_experts_of_layers(ckpt, family, layers, shape, dump, options, routing, groups, device,
                                         reads_experts or options.experts < shape.num_experts, progress)
    ranking = time.perf_counter() - ranking
    out_layers, specs, copy_with, writes = _output_layout(ckpt, family, layers, options, shape, selection)
    if storage.compressed is not None and "quantization_config" in out_config:  # (its ignore list names experts)
        out_config["quantization_config"] = _carried_quantization(ckpt, family, layers, options, selection, notes)
    out_config = file_config(ckpt.file_config, config, out_config)  # (a composite model's: back in its sections)
    fingerprint = ckpt.fingerprint()
    # What each layer is computed with (every executor, and a resume): the cores shared out among local workers
    threads = options.threads or max(1, torch.get_num_threads() // workers)
    run = run_key(
        options_record=options.method_record(), max_shard_size=options.max_shard_size, device_type=device.type,
        device_name=device_name(device), threads=threads, source_fingerprint=fingerprint,
        source_files=files_stamp([source / "config.json", *(source / f for f in ckpt.shard_files)]),
        calib_files=tree_stamp(calib) if dump is not None else None,
    )
    tokens = max((s.tokens for s in selection.values()), default=0)
    costs = _estimates(family, config, storage, shape, layers, options, tokens, reads_experts, device, notes,
                       len(ckpt.entries))
    return RewritePlan(
        source=source, out=out, calib=calib, options=options, family=family, storage=storage, shape=shape,
        layers=layers, out_layers=out_layers, selection=selection, specs=specs,
        shards=layout_shards(specs, options.max_shard_size), copy_with=copy_with, writes=writes,
        out_config=out_config, notes=notes, run=run, fingerprint=fingerprint, device=device, groups=groups,
        routing=routing, reads_experts=reads_experts, estimates=costs, side_bytes=side_files_size(source),
        dump=dump, config=config, ranking_seconds=ranking, threads=threads, origin=origin,
    )


def _output_layout(ckpt: Checkpoint, family: Family, layers: list[MoELayer], options: RewriteOptions,
                   shape: ModelShape, selection: dict[int, LayerSelection]
                   ) -> tuple[list[MoELayer], list[TensorSpec], dict, dict]:
    """The output's layers, its tensors, what each layer's write copies, and every name each layer writes."""
    dequantized = options.output_dtype is not None
    width = options.intermediate_size or shape.intermediate
    kept = {i: s.kept for i, s in selection.items()}
    out_layers = output_layers(layers, dequantized, kept, options.experts, shape.num_experts)
    specs, copied = plan_output(ckpt, family, out_layers, options.experts, width, dequantized)
    copy_with = copies_by_layer(copied, [layer.index for layer in layers], family)
    writes = {layer.index: [*copy_with[layer.index], *layer_output_names(family, layer, options.experts)]
              for layer in out_layers}
    check_plan_complete(specs, writes)
    return out_layers, specs, copy_with, writes


def _carried_quantization(ckpt: Checkpoint, family: Family, layers: list[MoELayer], options: RewriteOptions,
                          selection: dict[int, LayerSelection], notes: list[str]) -> dict:
    """The output's compressed-tensors quantization_config: the input's, with the entries of its ignore list and
    targets that name routed experts carried over to the kept ones (layout/compressed_experts.py)."""
    before = ckpt.config["quantization_config"]
    after = output_quantization_config(ckpt, family, [layer.index for layer in layers], options.experts,
                                       {i: s.kept for i, s in selection.items()})
    if after != before:
        notes.append("quantization_config's ignore list or targets name routed experts: carried over to the kept "
                     "experts' new numbers (docs/formats.md, compressed-tensors checkpoints)")
    return after


def _estimates(family: Family, config: dict, storage: ExpertStorage, shape: ModelShape, layers: list[MoELayer],
               options: RewriteOptions, tokens: int, reads_experts: bool, device: torch.device,
               notes: list[str], tensors: int) -> Estimates:
    """What the rewrite will cost; a note when its estimated peak exceeds the memory it computes in."""
    stored = dtype_size(layers[0].dtype) if not storage.mxfp4 else 0.5

    def costs_of(o: RewriteOptions) -> Estimates:
        return estimate(shape, o, storage, stored, tokens, family.top_k(config), reads_experts, device.type != "cpu",
                        tensors)

    costs = costs_of(options)
    note = memory_note(costs, options, device, tokens, costs_of)
    if note is not None:
        notes.append(note)
    return costs


def _open_dump(calib, options, family, shape, layer_indices, ckpt, notes) -> CalibDump | None:
    """Open and check the dump before any work starts (a bad dump must not cost a long run).

    Layers the dump does not calibrate (a multi-token-prediction layer) are ranked by router norm."""
    if options.importance == "router-norm":
        notes.append("importance from router weight norms (no calibration data): weaker than routing statistics")
        return None
    dump = CalibDump(calib)
    dump.check_matches(family.model_type, shape.hidden, shape.num_experts)
    available = set(dump.attrs.get("moe_layers") or [])
    decoder_layers = family.decoder_layers(ckpt.config)
    for i in layer_indices:
        if i in available:
            dump.layer(i)  # complete and non-empty, or a clear error now
            dump.check_router(i, ckpt.load(family.router_name(i)))  # routers are small: check all up front
        elif i >= decoder_layers:
            # DeepSeek-V3's multi-token-prediction layer sits past the decoder; no forward pass reaches it.
            notes.append(f"layer {i} (multi-token prediction) has no calibration inputs: ranked by router norm")
        else:
            raise DernError(f"calibration dump {dump.path} has no inputs for MoE layer {i}")
    rows = min((dump.layer(i).shape[0] for i in layer_indices if i in available), default=0)
    if options.refit_steps and 0 < rows < options.fit_tokens:
        # The steps learn a small sample's tokens (docs/quality.md, "The fit sample"): worth saying before a long run.
        notes.append(f"the dump holds {rows} inputs per layer, fewer than --fit-tokens {options.fit_tokens}: the "
                     f"gradient refit generalises better from a dump of {options.fit_tokens} tokens or more")
    return dump
