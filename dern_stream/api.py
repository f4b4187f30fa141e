"""The rewrite, as one straight pipeline: check everything, then stream layer by layer into a staged OUT."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .audit import audit_record, layer_record, write_audit
from .calib import CalibDump
from .checkpoint import (
    Checkpoint,
    NonFiniteTensor,
    ShardedWriter,
    StagedOutput,
    check_free_space,
    check_output_location,
    copy_side_files,
    resolve_checkpoint,
    side_files_size,
    write_durably,
)
from .checkpoint.integrity import CHECKSUM, checksum
from .checkpoint.source import INDEX_NAME
from .device import resolve_device
from .errors import DernError, describe
from .families import family_for
from .host_memory import map_large_blocks, return_freed_memory
from .layer_rewrite import (
    LayerInputs,
    compress_layer,
    copy_tensor,
    expert_tensor_names,
    layer_importance,
    layer_output_names,
    layer_routing,
    read_layer,
    write_layer,
)
from .layout import (
    ModelShape,
    check_decoder_layers,
    check_moe_layers,
    check_plan_complete,
    copies_by_layer,
    output_layers,
    plan_output,
)
from .locks import reading_dump
from .options import RewriteOptions
from .pipeline import run_pipeline
from .run_identity import files_stamp, run_key, tree_stamp
from .stage_clock import StageClock
from .storage import expert_storage
from .storage.reading import check_fp8_tensors
from .targets import read_paths

log = logging.getLogger("dern_stream")


@dataclass
class RewriteSummary:
    output: Path
    model_type: str
    layers: int
    experts_in: int
    experts_out: int
    segments_pooled: int
    segments_reassigned: int
    output_bytes: int
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # busy seconds per stage; they overlap

    def __str__(self) -> str:
        frac = self.segments_reassigned / self.segments_pooled if self.segments_pooled else 0.0
        lines = [
            f"done: {self.layers} MoE layers of {self.model_type}, experts {self.experts_in} -> {self.experts_out}",
            f"segments reassigned: {self.segments_reassigned} of {self.segments_pooled} pooled ({frac:.1%})",
            f"output: {self.output} ({self.output_bytes / 1e9:.3f} GB of tensors) in {self.seconds:.1f} s "
            f"on {self.device}",
        ]
        if self.stages:
            lines.append("busy time by stage (stages overlap): "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items()))
        return "\n".join(lines)


def rewrite(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experts: int,
    calib: str | os.PathLike | None = None,
    method: str | None = None,
    recipe: str | None = None,
    alpha: float | None = None,
    sim_components: str | tuple[str, ...] | None = None,
    kmeans_iters: int | None = None,
    intermediate_size: int | None = None,
    importance: str | None = None,
    router_transfer: bool | None = None,
    kmeans_init: str | None = None,
    alpha_candidates: str | tuple[float, ...] | None = None,
    refit: bool | None = None,
    refit_ridge: float | None = None,
    fit_tokens: int | None = None,
    output_dtype: str | None = None,
    device: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
) -> RewriteSummary:
    """Rewrite the MoE checkpoint `src` (directory or Hub repo id) into `out` with `experts` experts per
    MoE layer, built by DERN (or by `method`; `recipe="best"` is the recommended setting, see the
    README). Options left as None take the recipe's value, else the paper's default. Raises DernError,
    with a one-line message, for any bad input; `out` is then left as it was.

    An interrupted run (killed, disk full, Ctrl-C) leaves its finished layers in `.OUT.dern-partial`
    beside `out`; the same call resumes from them, and the result is byte-identical to an
    uninterrupted run. `restart=True` discards them instead.

    Sets glibc's mmap threshold to 4 MiB for the process (host_memory.map_large_blocks)."""
    started = time.perf_counter()
    map_large_blocks()
    options = RewriteOptions.build(
        experts, recipe, method=method, alpha=alpha, sim_components=sim_components, kmeans_iters=kmeans_iters,
        intermediate_size=intermediate_size, importance=importance, router_transfer=router_transfer,
        kmeans_init=kmeans_init, alpha_candidates=alpha_candidates, refit=refit, refit_ridge=refit_ridge,
        fit_tokens=fit_tokens, output_dtype=output_dtype, device=device, max_shard_size=max_shard_size,
    )
    source = resolve_checkpoint(src)
    out_path = Path(out).expanduser().resolve()
    calib = Path(calib).expanduser() if calib is not None else None
    check_output_location(out_path, overwrite, {**read_paths("the input checkpoint", source),
                                                "the calibration dump": calib})

    ckpt = Checkpoint(source)
    config = ckpt.config
    family = family_for(config)
    storage = expert_storage(config)
    check_fp8_tensors(ckpt)
    dequantized = options.output_dtype is not None
    if dequantized and not storage.quantized:
        raise DernError(f"--output-dtype {options.output_dtype} writes a quantized checkpoint dequantized; "
                        f"{source} is not quantized (config.json has no quantization_config): leave it out")
    shape = ModelShape(family.num_experts(config), int(config.get("hidden_size", 0)), family.intermediate_size(config))
    if options.experts > shape.num_experts:
        raise DernError(f"--experts {options.experts} exceeds the model's {shape.num_experts} experts per layer")
    if options.intermediate_size is not None and options.intermediate_size > shape.intermediate:
        raise DernError(f"--intermediate-size {options.intermediate_size} exceeds the experts' current "
                        f"{shape.intermediate}; it can only shrink them")
    width = options.intermediate_size
    if storage.fp8 and not dequantized and width is not None and any(width > b and width % b for b in storage.block):
        # Loaders infer the block from the scale grid (transformers) or require whole blocks (vLLM).
        raise DernError(f"--intermediate-size {width} splits the FP8 scale blocks {list(storage.block)}: use a "
                        f"multiple of {max(storage.block)}, at most {min(storage.block)}, or --output-dtype bf16")
    if options.refit and family.fused is not None and family.fused.biased:
        raise DernError(f"--refit does not model {family.model_type}'s expert biases yet; leave it out "
                        "(--recipe best uses it: give --no-refit)")
    if storage.mxfp4 and not dequantized and width is not None and width % 32:
        raise DernError(f"--intermediate-size {width} is not a multiple of 32, MXFP4's group size: use one, "
                        "or --output-dtype bf16")
    check_decoder_layers(ckpt)
    layers = check_moe_layers(ckpt, family, shape, storage)
    family.check_expressible(config, options.experts)
    out_config, notes = family.output_config(config, options.experts, options.intermediate_size)
    dropped = [name for name in ckpt.entries if family.is_dropped(name)]
    if dropped:
        notes.append(f"the {len(dropped)} mtp.* tensors (a multi-token-prediction block, which transformers does not "
                     f"load) are not carried over: their routed experts would disagree with K")
    if dequantized:
        del out_config["quantization_config"]
        notes.append(f"quantized weights written as {options.output_dtype}, without their scales and "
                     "quantization_config")

    with ExitStack() as held:
        if calib is not None and calib.is_dir():  # held while the dump is read: no `dump --overwrite` under it
            held.enter_context(reading_dump(calib))
        groups = family.group_plan(config, options.experts)
        routing = layer_routing(family, config, out_config)
        dump, calibrated = _open_dump(calib, options, family, shape, [layer.index for layer in layers], ckpt, notes)
        for note in notes:
            log.warning("note: %s", note)
        compute = resolve_device(options.device)
        width = options.intermediate_size or shape.intermediate
        out_layers = output_layers(layers, dequantized)
        specs, copied = plan_output(ckpt, family, out_layers, options.experts, width, dequantized)

        by_index = {layer.index: layer for layer in layers}
        copy_with = copies_by_layer(copied, list(by_index))
        writes = {layer.index: [*copy_with[layer.index], *layer_output_names(family, layer, options.experts)]
                  for layer in out_layers}
        check_plan_complete(specs, writes)
        with_experts = options.reads_expert_weights(shape.num_experts, shape.intermediate)

        def read_ahead(layer) -> list[str]:
            """What the rest of a layer's work reads from the input: its copied tensors, and its experts when
            all of them will be read (by the computation, or copied when every expert is kept)."""
            names = list(copy_with[layer.index])
            if with_experts or options.experts == shape.num_experts:
                names += expert_tensor_names(family, layer, shape.num_experts)
            return names

        clock = StageClock(compute)
        # Routing statistics need only a layer's router and its cached inputs, so they are computed a
        # layer ahead on a thread of their own: reading the dump then never holds up the layer being
        # written (benchmarks/io_speed.py: pass-through 1.24x -> 1.05x copy + fsync). Not when the options
        # also sample those inputs for fitting: the sample would be held a layer early.
        scorer = ThreadPoolExecutor(1, thread_name_prefix="dern-score") \
            if dump is not None and not options.uses_layer_outputs else None
        fingerprint = ckpt.fingerprint()
        run = run_key(
            options_record=options.method_record(), max_shard_size=options.max_shard_size, device_type=compute.type,
            source_fingerprint=fingerprint,
            source_files=files_stamp([source / "config.json", *(source / f for f in ckpt.shard_files)]),
            calib_files=tree_stamp(calib) if dump is not None else None,
        )
        stage = StagedOutput(out_path, run, restart, overwrite)
        try:
            with stage:
                records = stage.progress.layers  # per-layer audit entries (plain numbers), resumed ones first
                if records:
                    log.info("resuming %s: %d of %d MoE layers already done", stage.path, len(records), len(layers))
                check_free_space(stage.path, sum(spec.nbytes for spec in specs) + side_files_size(source))
                writer = ShardedWriter(stage.path, specs, options.max_shard_size, resume=stage.resumed)
                try:
                    for index in records:
                        for name in writes[int(index)]:
                            writer.skip(name)
                    todo = [layer for layer in layers if str(layer.index) not in records]
                    with tqdm(total=len(layers), initial=len(layers) - len(todo), desc="rewrite MoE layers",
                              unit="layer", disable=not progress) as bar:

                        def read(layer) -> LayerInputs:
                            inputs = read_layer(ckpt, family, layer, shape, with_experts, clock)
                            if scorer is not None and layer.index in calibrated:
                                # Scored from the dump on a thread of its own while the bytes are read ahead.
                                inputs.importance = scorer.submit(layer_importance, dump, layer.index, inputs.router,
                                                                  inputs.bias, routing.before, compute, clock=clock)
                            with clock("read"):
                                ckpt.prefetch(read_ahead(layer))
                            return inputs

                        def compute_layer(inputs: LayerInputs):
                            layer_dump = dump if inputs.layer.index in calibrated else None
                            return compress_layer(inputs, family, shape, layer_dump, groups, options, compute,
                                                  routing, clock)

                        def write(report) -> None:
                            with clock("write"):
                                for name in copy_with[report.index]:
                                    copy_tensor(writer, ckpt, name)
                                write_layer(writer, ckpt, family, by_index[report.index], report, dequantized)
                                record = {**layer_record(report), "checksums": writer.take_checksums()}
                                # Journaled once flushed: a resumed run trusts exactly what is on disk.
                                writer.commit(lambda: stage.progress.add(report.index, record))
                            return_freed_memory()  # freed layer buffers go back to the OS, not into heap fragments
                            bar.update()
                            bar.set_postfix(layer=report.index, reassigned=record["segments_reassigned"])

                        try:
                            run_pipeline(todo, read, compute_layer, write)
                        finally:
                            if scorer is not None:
                                scorer.shutdown(cancel_futures=True)
                    with clock("write"):
                        writer.finish()
                finally:
                    writer.close()
                    ckpt.release()
                copied_files, skipped = copy_side_files(source, stage.path)
                if skipped:
                    notes.append(f"not copied (weights in other formats or folders): {', '.join(skipped)}")
                    log.warning("note: %s", notes[-1])
                # config.json is written last: a directory without it never looks like a loadable checkpoint.
                config_bytes = (json.dumps(out_config, indent=2) + "\n").encode()
                written = [*copied_files, *([INDEX_NAME] if len(writer.files) > 1 else [])]
                files = {name: checksum((stage.path / name).read_bytes()) for name in written}
                files["config.json"] = checksum(config_bytes)
                records = {k: records[k] for k in sorted(records, key=int)}
                write_audit(stage.path, audit_record(
                    source=source, fingerprint=fingerprint, calib=calib.resolve() if calib else None,
                    model_type=family.model_type, num_experts=shape.num_experts, intermediate=shape.intermediate,
                    options=options, config_notes=notes, layers=records, run=run, device=compute,
                    calib_provenance=dump.attrs.get("provenance") if dump is not None else None,
                    checksums={"algorithm": CHECKSUM, "headers": writer.header_checksums,
                               "files": dict(sorted(files.items()))},
                ))
                write_durably(stage.path / "config.json", config_bytes)
        except NonFiniteTensor:
            # Resuming would meet the same values: the input must change first (and a changed input
            # starts over), so the finished layers are of no use.
            shutil.rmtree(stage.path, ignore_errors=True)
            raise
        except (DernError, OSError) as e:
            if stage.path.exists():  # finished layers were kept
                raise DernError(f"{describe(e)} ({len(stage.progress.layers)} of {len(layers)} MoE layers are done "
                                f"and kept in {stage.path}: run the same command again to resume)") from e
            raise

        return RewriteSummary(
            output=out_path, model_type=family.model_type, layers=len(records),
            experts_in=shape.num_experts, experts_out=options.experts,
            segments_pooled=len(layers) * (shape.num_experts - options.experts) * shape.intermediate,
            segments_reassigned=sum(r["segments_reassigned"] for r in records.values()),
            output_bytes=writer.total_size, seconds=time.perf_counter() - started, device=str(compute), notes=notes,
            stages=dict(clock.seconds),
        )


def _open_dump(calib, options, family, shape, layer_indices, ckpt, notes) -> tuple[CalibDump | None, set[int]]:
    """Open and check the dump before any work starts (a bad dump must not cost a long run).

    Returns the dump and the MoE layers it calibrates; the others are ranked by router norm."""
    if options.importance == "router-norm":
        if options.uses_layer_outputs:
            raise DernError(f"--method {options.method} with these options needs the layers' cached inputs: "
                            "pass --calib DUMP instead of --importance router-norm")
        if calib is not None:
            raise DernError("--importance router-norm ignores the calibration dump; pass one or the other")
        notes.append("importance from router weight norms (no calibration data): weaker than routing statistics")
        return None, set()
    if calib is None:
        raise DernError("--calib DUMP is required (a calibration dump of the MoE layers' inputs, see the README), "
                        "or pass --importance router-norm for the weaker parameter-only ranking")
    dump = CalibDump(calib)
    dump.check_matches(family.model_type, shape.hidden, shape.num_experts)
    available = set(dump.attrs.get("moe_layers") or [])
    decoder_layers = int(ckpt.config.get("num_hidden_layers", 0))
    for i in layer_indices:
        if i in available:
            dump.layer(i)  # complete and non-empty, or a clear error now
            dump.check_router(i, ckpt.load(family.router_name(i)))  # routers are small: check all up front
        elif i >= decoder_layers:
            # DeepSeek-V3's multi-token-prediction layer sits past the decoder; no forward pass reaches it.
            notes.append(f"layer {i} (multi-token prediction) has no calibration inputs: ranked by router norm")
        else:
            raise DernError(f"calibration dump {dump.path} has no inputs for MoE layer {i}")
    return dump, available & set(layer_indices)
