"""`dern-stream verify OUT [--against IN]`: is a rewritten checkpoint whole and consistent?

Checks, each reading one tensor at a time:
  index     the index and the shards agree (every entry's shard holds it, no tensor outside the
            index, no stray shard, total_size right)
  config    every tensor the config implies is present with the right shape (the MoE layers by the
            family's layout; the rest by the model transformers builds from config.json on the meta
            device), the experts in one float dtype, and no tensor the config does not imply
  finite    no NaN or Inf in any floating-point tensor
  audit     dern_stream.json agrees with the config (expert count, width, model type, MoE layers)
  routing   the config can route (top-k within the experts, groups that transformers and vLLM accept);
            a config that cannot is refused with one line, as is any config value of the wrong type
  checksums every tensor's bytes, every shard header and every other file the rewrite wrote match the
            checksums it recorded in dern_stream.json (any change to the output since is found)
  against   with IN: IN is the input (the fingerprint dern_stream.json records: else one line, before
            any tensor is read); every tensor the rewrite does not change is byte-identical to IN's (the
            non-MoE tensors, the kept experts written unchanged, the score-correction bias rows), and
            every tensor keeps IN's dtype
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, resolve_checkpoint
from ..checkpoint.checksums import record_checksum
from ..checkpoint.integrity import CHECKSUM, bytes_finite, checksum, new_hasher
from ..checkpoint.safetensors_format import DTYPES, TensorEntry, read_header
from ..checkpoint.source import INDEX_NAME, SINGLE_NAME, pread_fully
from ..errors import DernError, arg
from ..families import PARTS, family_for
from ..layout.fused_tensors import fused_tensors
from ..layout.moe_layers import ModelShape, check_decoder_layers, check_moe_layers, natural_key
from ..runtime.arguments import format_size
from ..storage import expert_storage
from ..storage.finite_values import dequantized_problem
from ..storage.formats import MXFP4_BLOCKS, SCALE_SUFFIX
from ..storage.reading import load_weight
from ..storage.tensor_kinds import check_fp8_tensors, compressed_parts, is_scaled_fp8
from .checks import check_verify_arguments

_COMPARE_CHUNK = 64 * 2**20


@dataclass
class VerifyReport:
    path: Path
    tensors: int = 0
    bytes_checked: int = 0
    identical: int = 0  # tensors found byte-identical to --against
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was found and is fine, but worth saying

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"verify {self.path}: {self.tensors} tensors, {format_size(self.bytes_checked)} read; "
                 f"checked: {', '.join(self.checks)}"]
        if self.identical:
            lines.append(f"{self.identical} tensors the rewrite does not change are byte-identical to the input")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def verify(out: str | os.PathLike, against: str | os.PathLike | None = None, progress: bool = True,
           revision: str | None = None) -> VerifyReport:
    """Check OUT (see the module doc). Problems are collected in the report; a checkpoint too broken
    to open at all raises DernError. `against` may be a Hub repo id, at `revision`."""
    root = check_verify_arguments(out, against, revision)
    report = VerifyReport(root)
    ckpt = Checkpoint(root)  # index <-> shard names and offsets; a failure here is a DernError
    report.tensors = len(ckpt.entries)
    _check_index(ckpt, report)
    family = family_for(ckpt.config)
    shape = ModelShape(family.num_experts(ckpt.config), int(ckpt.config.get("hidden_size", 0)),
                       family.intermediate_size(ckpt.config))
    try:
        check_fp8_tensors(ckpt)
        stored = family.stored_layout(ckpt.entries, shape.hidden, shape.intermediate)  # (the forward's: either)
        layers = check_moe_layers(ckpt, stored, shape, expert_storage(ckpt.config))
    except DernError as e:
        report.problems.append(str(e))
        layers = []
    audit = _check_audit(ckpt, family, shape, family.moe_layers(ckpt.entries), report)
    sums = _recorded_checksums(audit, ckpt.root / "dern_stream.json", report)
    try:
        check_decoder_layers(ckpt)
    except DernError as e:
        report.problems.append(str(e))
    else:  # (the skeleton is built from the config: not from one that disagrees with the tensors)
        _check_skeleton(ckpt, family, report, set(sums["tensors"]) if sums is not None else set())
    report.checks += ["index", "config"]
    report.checks.append("routing")  # (family_for refused a config that cannot route: config_check.py)
    report.checks.append("audit")
    if sums is not None:
        _check_files(ckpt, sums, report)
    source = Checkpoint(resolve_checkpoint(against, revision)) if against is not None else None
    if source is not None:
        _check_is_input(ckpt, source, audit)
    _scan(ckpt, family, layers, audit, sums, source, report, progress)
    report.checks.append("finite")
    if sums is not None:
        report.checks.append("checksums")
    if source is not None:
        report.checks.append(f"against {source.root}")
    ckpt.release()
    return report


def _check_index(ckpt: Checkpoint, report: VerifyReport) -> None:
    shards = sorted(p.name for p in ckpt.root.glob("*.safetensors"))
    stray = sorted(set(shards) - set(ckpt.shard_files))
    if stray:
        report.problems.append(f"shard files not named by the index: {', '.join(stray)}")
    index_path = ckpt.root / INDEX_NAME
    if not index_path.is_file():
        return
    if (ckpt.root / SINGLE_NAME).is_file() and SINGLE_NAME not in ckpt.shard_files:
        report.problems.append(f"both {SINGLE_NAME} and {INDEX_NAME} exist; loaders may pick either")
    for fname in ckpt.shard_files:
        outside = sorted(set(read_header(str(ckpt.root / fname))[0]) - set(ckpt.entries), key=natural_key)
        if outside:
            report.problems.append(f"{fname} holds {len(outside)} tensors the index does not name, e.g. {outside[0]}")
    metadata = json.loads(index_path.read_text()).get("metadata")  # a JSON object: Checkpoint read it
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if metadata is not None and not isinstance(metadata, dict):
        report.problems.append(f"{INDEX_NAME} metadata is not a JSON object")
    actual = sum(e.nbytes for e in ckpt.entries.values())
    if total is not None and total != actual:
        report.problems.append(f"{INDEX_NAME} says total_size {total}, the tensors hold {actual} bytes")


def _check_skeleton(ckpt: Checkpoint, family, report: VerifyReport, recorded: set[str]) -> None:
    """Every parameter of the model transformers builds from the config has its tensor(s), right shape. A tensor
    the config does not imply is a problem, unless the rewrite recorded it (`recorded`): a tensor of the input it
    copied as it was, which transformers ignores as the input's loader did."""
    if family.remote_code:
        report.checks.append(f"(non-MoE tensors not checked: transformers has no {family.model_type} class)")
        return
    try:
        from ..stream.executor import StreamedModel
        from ..stream.weights import disk_tensors
    except ImportError:  # transformers missing: the MoE layers were still checked
        report.checks.append("(non-MoE tensors not checked: transformers is not installed)")
        return
    model = StreamedModel(ckpt, torch.device("cpu"))
    used: set[str] = set()
    state = model.model.state_dict(keep_vars=True)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    for name, target in state.items():
        layer = family.memory_layer_of(name)
        try:
            used |= disk_tensors(name, tuple(target.shape), ckpt, family, layer, shapes)
        except DernError as e:
            report.problems.append(str(e))
    decoder_layers = family.decoder_layers(ckpt.config)
    extra = sorted((n for n in set(ckpt.entries) - used if (family.layer_of(n) or 0) < decoder_layers), key=natural_key)
    copied, unknown = [n for n in extra if n in recorded], [n for n in extra if n not in recorded]
    if unknown:
        report.problems.append(f"{len(unknown)} tensors the config does not imply, e.g. {unknown[0]}")
    if copied:
        report.notes.append(f"{len(copied)} tensors the config does not imply, copied from the input as the rewrite "
                            f"recorded them (transformers does not load them), e.g. {copied[0]}")


def _check_audit(ckpt: Checkpoint, family, shape: ModelShape, moe_layers: list[int], report: VerifyReport
                 ) -> dict | None:
    """dern_stream.json, checked against the config; None (with problems reported) when it is missing or
    not a record this tool writes. Its layer records are checked to be usable (kept experts: distinct
    indices of the input's experts), so that the later checks can rely on them."""
    path = ckpt.root / "dern_stream.json"
    if not path.is_file():
        report.problems.append("no dern_stream.json: not written by dern-stream, or not completely")
        return None
    try:
        audit = json.loads(path.read_text())
        source_experts = audit["source"]["num_experts"]
        expect = {
            "num_experts": (audit["num_experts"], shape.num_experts),
            "intermediate_size": (audit["intermediate_size"], shape.intermediate),
            "source.model_type": (audit["source"]["model_type"], family.model_type),
            "MoE layers": (sorted(str(i) for i in audit["layers"]), sorted(str(i) for i in moe_layers)),
        }
        for key, (recorded, actual) in expect.items():
            if recorded != actual:
                report.problems.append(f"dern_stream.json {key} is {recorded}, the checkpoint has {actual}")
        bad = [i for i, rec in audit["layers"].items() if not _usable_layer(rec, shape.num_experts, source_experts)]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        report.problems.append(f"dern_stream.json is not a valid record ({type(e).__name__}: {e})")
        return None
    if bad:
        report.problems.append(f"dern_stream.json layer {bad[0]}: kept experts do not match the config")
        return None
    return audit


def _check_is_input(ckpt: Checkpoint, source: Checkpoint, audit: dict | None) -> None:
    """Refuse, in one line and before any tensor is read, an IN that is not the rewrite's input, when
    dern_stream.json is intact (its record_checksum holds) and records the input's fingerprint. The
    fingerprint covers config.json and every tensor's name, dtype and shape, not the values: an IN
    changed in place is found by the byte comparison that follows."""
    record = audit.get("source") if audit is not None else None
    recorded = record.get("fingerprint") if isinstance(record, dict) else None
    if not isinstance(recorded, str) or audit.get("record_checksum") != record_checksum(audit):
        return  # nothing to go by (a changed record is a problem of its own): every tensor is compared
    if source.fingerprint() != recorded:
        named = next((record[k] for k in ("repo_id", "name", "path") if isinstance(record.get(k), str)), None)
        was = f" ({named})" if named else ""
        source.release()
        ckpt.release()
        raise DernError(f"{arg('against', str(source.root))} is not the checkpoint {ckpt.root.name} was rewritten "
                        f"from: its config.json or its tensors' names, dtypes or shapes differ from those of the "
                        f"input{was}, whose fingerprint dern_stream.json records")


def _usable_layer(rec, experts: int, source_experts) -> bool:
    if not isinstance(rec, dict) or type(source_experts) is not int:
        return False
    kept, rebuilt = rec.get("kept"), rec.get("rebuilt_experts")
    indices = (kept, rebuilt) if isinstance(kept, list) and isinstance(rebuilt, list) else ([None], [])
    in_range = all(type(e) is int and 0 <= e < source_experts for e in indices[0] + indices[1])
    return in_range and len(kept) == experts == len(set(kept)) and set(rebuilt) <= set(kept)


def _recorded_checksums(audit: dict | None, path: Path, report: VerifyReport) -> dict | None:
    """The checksums dern_stream.json records, if usable: {"tensors", "headers", "files"} each name -> hex.
    The record itself: its values must match its `record_checksum`, and its bytes the way the rewrite
    writes them (so that no byte of it can change unseen either)."""
    if audit is None:
        return None
    legacy = str(audit.get("dern_stream_version", "")).startswith("0.1.")  # before checksums were recorded
    recorded = audit.get("record_checksum")
    if (recorded is not None or not legacy) and recorded != record_checksum(audit):
        report.problems.append("dern_stream.json was changed after the rewrite wrote it (its record_checksum differs)")
    elif not legacy and path.read_bytes() != (json.dumps(audit, indent=2) + "\n").encode():
        report.problems.append("dern_stream.json's bytes differ from what the rewrite wrote (same values, other text)")
    sums = audit.get("checksums")
    if sums is None and legacy:
        report.checks.append("(no checksums: written by dern-stream 0.1, which did not record them)")
        return None
    ok = isinstance(sums, dict) and sums.get("algorithm") == CHECKSUM and all(
        isinstance(sums.get(k), dict) and all(isinstance(v, str) for v in sums[k].values())
        for k in ("tensors", "headers", "files"))
    if not ok:
        report.problems.append(f"dern_stream.json holds no usable checksums ({CHECKSUM} of tensors, headers, files)")
        return None
    return sums


def _check_files(ckpt: Checkpoint, sums: dict, report: VerifyReport) -> None:
    """Shard headers and the other files the rewrite wrote, against their recorded checksums."""
    for fname in sorted(set(ckpt.shard_files) | set(sums["headers"])):
        path = ckpt.root / fname
        if fname not in sums["headers"] or not path.is_file():
            what = "was not written by the rewrite" if path.is_file() else "is missing"
            report.problems.append(f"shard {fname} {what}")
            continue
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            head = struct.pack("<Q", n) + f.read(n)
        if checksum(head) != sums["headers"][fname]:
            report.problems.append(f"{fname}'s header differs from the one the rewrite wrote")
    others = {p.name for p in ckpt.root.iterdir() if p.is_file() and not p.name.startswith(".")
              and not p.name.endswith(".safetensors") and p.name != "dern_stream.json"}
    for name in sorted(others | set(sums["files"])):
        path = ckpt.root / name
        if name not in sums["files"]:
            report.problems.append(f"{name} was not written by the rewrite (dern_stream.json has no checksum of it)")
        elif not path.is_file():
            report.problems.append(f"{name}, written by the rewrite, is missing")
        elif checksum(path.read_bytes()) != sums["files"][name]:
            report.problems.append(f"{name} differs from the file the rewrite wrote")


def _scan(ckpt: Checkpoint, family, layers, audit: dict | None, sums: dict | None, source: Checkpoint | None,
          report: VerifyReport, progress: bool) -> None:
    """Read every tensor once, in chunks: finite values, checksums; with `source`, dtypes and the
    unchanged tensors' bytes."""
    counterpart = _counterparts(ckpt, family, layers, audit, source) if source is not None else {}
    recorded = dict(sums["tensors"]) if sums is not None else None
    differing: dict[str, str] = {}  # tensor the rewrite leaves unchanged that is not IN's -> why
    names = sorted(ckpt.entries, key=natural_key)
    buffer = memoryview(bytearray(_COMPARE_CHUNK))
    for name in tqdm(names, desc="verify", unit="tensor", disable=not progress):
        entry = ckpt.entries[name]
        report.bytes_checked += entry.nbytes
        hasher, finite = new_hasher(), True
        for view in _chunks(entry, buffer):
            finite = finite and bytes_finite(view, entry.dtype)
            hasher.update(view)
        if not finite:
            report.problems.append(f"{name} holds NaN or Inf")
        problem = dequantized_problem(ckpt, name.removesuffix(MXFP4_BLOCKS))  # a quantized weight's values
        if problem is not None:
            report.problems.append(problem)
        if recorded is not None:
            expected = recorded.pop(name, None)
            if expected is None:
                report.problems.append(f"{name} was not written by the rewrite (no checksum of it is recorded)")
            elif hasher.hexdigest() != expected:
                report.problems.append(f"{name}'s bytes differ from what the rewrite wrote (checksum mismatch)")
        if source is not None:
            _compare_to_source(ckpt, name, source, counterpart.get(name, (None, "changed")), differing, report)
    if recorded:
        report.problems.append(f"{len(recorded)} tensors the rewrite wrote are missing, e.g. {min(recorded)}")
    if len(differing) > 1:  # same names and shapes (the fingerprint matched, or is not recorded), other values
        report.problems.append(f"{len(differing)} tensors the rewrite leaves unchanged differ from {source.root}'s "
                               f"(e.g. {next(iter(differing))}): it holds other weights than this checkpoint's input, "
                               "or one of the two was changed since the rewrite")
    else:
        report.problems += differing.values()
    if source is not None:
        source.release()


def _compare_to_source(ckpt: Checkpoint, name: str, source: Checkpoint, counterpart: tuple[str | None, str | list[int]],
                       differing: dict[str, str], report: VerifyReport) -> None:
    """One OUT tensor against its IN counterpart: the same dtype (or IN's FP8 or compressed-tensors weight dequantized
    to bf16), and the same values where the rewrite leaves it unchanged; a tensor whose values differ goes into
    `differing`."""
    entry = ckpt.entries[name]
    src_name, mode = counterpart
    if src_name is None:
        report.problems.append(f"{name} has no counterpart in {source.root}")
        return
    src = source.entries.get(src_name)  # None: a compressed-tensors weight of IN, stored as its own tensors
    stored = "FP8" if src is not None and is_scaled_fp8(source, src_name) else "compressed"
    # (with IN's FP8 weights, an unquantized expert of a compressed-tensors IN: written in bf16 with the rest)
    dequantized = src is None or (src.dtype != entry.dtype and entry.dtype == "BF16" and (
        is_scaled_fp8(source, src_name) or expert_storage(source.config).compressed is not None))
    if dequantized:  # --output-dtype: the input's quantized weight, dequantized
        if mode != "same":
            return
        if torch.equal(ckpt.load(name), load_weight(source, src_name).to(DTYPES[entry.dtype])):
            report.identical += 1
        else:
            differing[name] = f"{name} is not {source.root.name}'s {stored} {src_name} dequantized"
    elif src.dtype != entry.dtype:
        report.problems.append(f"{name} is {entry.dtype}, {source.root.name}'s {src_name} is {src.dtype}")
    elif isinstance(mode, list):  # score-correction bias: the kept experts' rows, as they were
        before = source.load(src_name)
        if max(mode, default=-1) >= before.shape[-1]:
            report.problems.append(f"the rewrite record's kept experts {mode} are not experts of "
                                   f"{source.root.name}'s {src_name} {list(before.shape)}: "
                                   "is it the rewrite's input?")
        elif torch.equal(ckpt.load(name), before[..., mode]):
            report.identical += 1
        else:
            differing[name] = f"{name} is not {source.root.name}'s {src_name} at the kept experts {mode}"
    elif mode == "same":
        if _same_bytes(entry, src):
            report.identical += 1
        else:
            differing[name] = (f"{name} differs from {source.root.name}'s {src_name}, but the rewrite leaves it "
                               "unchanged")


def _counterparts(ckpt, family, layers, audit, source) -> dict[str, tuple[str | None, str | list[int]]]:
    """OUT tensor -> (IN tensor it comes from, "same" (byte-identical), "changed", or the kept rows)."""
    moe = {layer.index for layer in layers}
    out: dict[str, tuple[str | None, str | list[int]]] = {}
    for name in ckpt.entries:
        if not any(family.is_layer_expert_tensor(i, name) or name in (family.router_name(i), family.bias_name(i))
                   for i in moe):
            out[name] = (name if name in source.entries else None, "same")
    records = (audit or {}).get("layers", {})
    for i in moe:
        rec = records.get(str(i))
        kept = rec["kept"] if rec else list(range(family.num_experts(ckpt.config)))
        rebuilt = set(rec["rebuilt_experts"]) if rec else set(kept)
        out[family.router_name(i)] = (family.router_name(i), "changed")  # the router update changes rows
        bias = family.bias_name(i)
        if bias in ckpt.entries:  # a bias in the router's logits follows Eq. 8 as the router does
            n = family.num_experts(source.config)  # the zero experts' entries follow the kept ones (LongCat-Flash)
            rows = kept + list(range(n, n + family.passive_experts(source.config)))
            out[bias] = (bias, "changed" if family.bias_in_logits else rows)
        if family.fused is not None:  # K experts in each tensor: checked as written (checksums), not by slice
            stored = fused_tensors(family, i, 0, 0, expert_storage(ckpt.config))
            out.update({t.name: (t.name, "changed") for t in stored})
            continue
        storage, in_storage = expert_storage(ckpt.config), expert_storage(source.config)
        layer = next(layer for layer in layers if layer.index == i)
        for pos, expert in enumerate(kept):
            for part in PARTS:
                new, old = family.expert_name(i, pos, part), family.expert_name(i, expert, part)
                # a weight's stored tensors go together: an FP8 weight and its scales, compressed-tensors' own (or,
                # dequantized, the weight they stand for)
                if storage.compressed is not None:  # (an expert unquantized in OUT was so in IN: it keeps its form)
                    names = zip(layer.tensor_names(new, pos), layer.tensor_names(old, pos), strict=True)
                elif in_storage.compressed is not None:
                    names = [(new, old)]
                else:
                    names = ((new + s, old + s) for s in ("", SCALE_SUFFIX))
                for new_name, old_name in names:
                    out[new_name] = (old_name, "changed" if expert in rebuilt else "same")
    return {k: (v if v[0] is None or v[0] in source.entries or compressed_parts(source, v[0]) is not None
                else (None, "changed")) for k, v in out.items()}


def _chunks(entry: TensorEntry, buffer: memoryview):
    """A tensor's stored bytes, a buffer-full at a time (the buffer is reused)."""
    with open(entry.file, "rb", buffering=0) as f:
        for start in range(0, entry.nbytes, len(buffer)):
            view = buffer[:min(len(buffer), entry.nbytes - start)]
            pread_fully(f.fileno(), view, entry.start + start, entry.file, "a tensor")
            yield view


def _same_bytes(a: TensorEntry, b: TensorEntry) -> bool:
    if a.nbytes != b.nbytes:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        done = 0
        while done < a.nbytes:
            n = min(_COMPARE_CHUNK, a.nbytes - done)
            if os.pread(fa.fileno(), n, a.start + done) != os.pread(fb.fileno(), n, b.start + done):
                return False
            done += n
    return True

