"""OUT/README.md: a Hugging Face model card for a rewrite's output, built from its dern_stream.json.

The card (docs/formats.md, "Model card"):
  front matter  base_model, library_name, pipeline_tag, tags; the base model card's license and language
  body          what was done (method, options, calibration), parameters before and after, the kept
                experts of each MoE layer, the `eval --json` results given to `card --eval`, how to load it
  base section  under "Card of the base model": the input's own README.md, its front matter in an HTML
                comment and its text unchanged, so that `card` finds it again and rebuilds the card
                around it any number of times

`rewrite` writes the card; `card` rebuilds it (with evaluation results) and records its new checksum in
dern_stream.json, so `verify` still passes. No torch here: `dern-stream card` runs without it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.checksums import CHECKSUM, checksum, record_checksum, sealed_record
from ..checkpoint.output_dir import AUDIT_NAME
from ..errors import DernError, arg
from ..evaluation.checks import EVAL_FORMAT, TASK_EVAL_FORMAT
from ..runtime.durable_files import write_replacing

CARD_NAME = "README.md"
BASE_CARD_NOTE = ("the input's README.md is kept in the output's README.md, below the model card dern-stream "
                  "writes (under \"Card of the base model\")")

_CARD_MARKER = "<!-- dern-stream model card, built from dern_stream.json: `dern-stream card OUT` rebuilds it. -->"
_BASE_MARKER = "<!-- dern-stream: the base model's README.md follows, unchanged (its front matter in a comment). -->"
_FM_OPEN = "<!-- the front matter of the base model's README.md:\n"
_FM_CLOSE = "-->\n"
_CARRIED = ("license", "license_name", "license_link", "language")  # from the base card's front matter
_IMPORTANCE = {"routing": "routing statistics", "router-norm": "router weight norms",
               "not needed": "not needed (every expert kept)"}  # rewrite_plan's importance sources
_EVAL_FIELDS = ("checkpoint", "perplexity", "nll_per_token", "tokens", "reference", "reference_perplexity", "kl_mean",
                "kl_p99", "top1_agreement", "layer_errors", "mean_rel_l2", "device")


@dataclass
class CardReport:
    path: Path
    changed: bool
    evaluations: int
    base_card: bool  # the base model's card is kept in it
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        what = "wrote" if self.changed else "unchanged:"
        lines = [f"{what} {self.path} (model card; {self.evaluations} evaluation(s); "
                 f"{'the base model card kept below it' if self.base_card else 'no base model card'})"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def card(out: str | os.PathLike, *, evals: Sequence[str | os.PathLike] | None = None) -> CardReport:
    """Rebuild OUT/README.md, the model card of the rewrite output `out`, from its dern_stream.json, and
    record the card's checksum there (so `verify` passes). `evals`: `eval --json` reports whose results
    the card shows (kept in dern_stream.json, "evaluations"); None keeps those given before, [] drops
    them. The base model's card inside the current README.md is kept. Raises DernError (one line) for a
    directory that is not a rewrite's output, and for a README.md changed since dern-stream wrote it,
    unless it is exactly the card this call writes: a change within the base model's card, which is
    kept (and recorded), or the card of an earlier call stopped before it recorded it."""
    root = Path(out).expanduser()
    if not root.is_dir():
        raise DernError(f"{out} is not a directory (give a rewrite's output)")
    root = root.resolve()
    record = _output_record(root)
    config = _read_config(root)
    record = {k: v for k, v in record.items() if k != "record_checksum"}
    if evals is not None:
        base_model = base_model_of(record["source"])[0]
        record.pop("evaluations", None)
        if evals:
            record["evaluations"] = [_evaluation(Path(p).expanduser(), root, base_model) for p in evals]
    readme, notes = root / CARD_NAME, []
    recorded = record["checksums"]["files"].get(CARD_NAME)
    current = _current_card(readme, recorded)
    if current is None and recorded is not None:
        notes.append(f"{readme} was missing: any base model card it held is not in the new card")
    base = base_card_of(_text(current)) if current is not None else None
    data = _bytes(render_card(record, config, base))
    if current is not None and checksum(current) != recorded and current != data:
        raise DernError(f"{readme} was changed after dern-stream wrote it (its checksum differs from "
                        f"{AUDIT_NAME}'s); card does not overwrite it: restore it, or remove it to have the card "
                        "written again (without the base model's card it holds)")
    record["checksums"]["files"] = dict(sorted({**record["checksums"]["files"], CARD_NAME: checksum(data)}.items()))
    changed = current != data
    if changed:  # the card first: killed before the record, a rerun finds the card it would write and goes on
        write_replacing(readme, data)
    sealed = sealed_record(record)
    if sealed != (root / AUDIT_NAME).read_bytes():
        write_replacing(root / AUDIT_NAME, sealed)
        changed = True
    return CardReport(readme, changed, len(record.get("evaluations") or []), base is not None, notes)


def write_card(directory: Path, record: dict, config: dict) -> None:
    """The rewrite's card: replaces the copy of the input's README.md in `directory` (kept inside the card)
    and records the card's checksum in `record` (before it is written)."""
    readme = directory / CARD_NAME
    base = _text(readme.read_bytes()) if readme.is_file() else None
    data = _bytes(render_card(record, config, base))
    write_replacing(readme, data)  # (a copy of a read-only README.md is replaced, not written into)
    files = record["checksums"]["files"]
    record["checksums"]["files"] = dict(sorted({**files, CARD_NAME: checksum(data)}.items()))


def base_model_of(source: dict) -> tuple[str, str | None]:
    """(base_model, revision) from dern_stream.json's "source": a Hub repo id where the input was one
    (`repo_id`, or a path into huggingface_hub's cache), else the input directory's name."""
    if isinstance(source.get("repo_id"), str):
        # The commit pins what was read; the revision (a branch) may have moved since.
        revision = source.get("commit") or source.get("revision")
        return source["repo_id"], revision if isinstance(revision, str) else None
    for key in ("name", "directory"):
        if isinstance(source.get(key), str):
            return Path(source[key]).name, None
    path = source.get("path")
    return model_name(path) if isinstance(path, str) else ("unknown", None)


def model_name(path: str) -> tuple[str, str | None]:
    """A checkpoint directory's name, or (repo id, revision) for a snapshot in huggingface_hub's cache
    (`.../models--ORG--NAME/snapshots/REVISION`)."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1), parts[-1]
    return Path(path).name, None


def base_card_of(readme: str) -> str | None:
    """The base model's README.md inside a card this module wrote (None when it holds none); a README.md
    that is not such a card is a copy of the input's (an output written before dern-stream wrote cards)."""
    _, rest = _split_front_matter(readme)
    if not rest.startswith(_CARD_MARKER):
        return readme
    at = readme.find(f"\n{_BASE_MARKER}\n")
    if at < 0:
        return None
    after = readme[at + len(_BASE_MARKER) + 2:]
    if after.startswith(_FM_OPEN):
        front, rest = _split_front_matter(after[len(_FM_OPEN):])
        if front and rest.startswith(_FM_CLOSE):
            return front + rest[len(_FM_CLOSE):]
    return after


def render_card(record: dict, config: dict, base_readme: str | None) -> str:
    """The card's text, from the rewrite's record, the output's config.json and the input's README.md."""
    from huggingface_hub import ModelCardData

    base, revision = base_model_of(record["source"])
    front, base_body = _split_front_matter(base_readme) if base_readme is not None else ("", None)
    carried = {k: v for k, v in _front_matter_data(front).items() if k in _CARRIED and v is not None}
    model_type = record["source"].get("model_type") or config.get("model_type")
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation",
                         tags=[t for t in ("moe", "dern-stream", record.get("method"), "pruned", "expert-pruning",
                                           model_type) if isinstance(t, str)], **carried)
    lines = [_CARD_MARKER, "", *_summary(record, base, revision), *_options(record), *_parameters(record),
             *_kept(record), *_evaluations(record.get("evaluations") or []), *_notes(record),
             *_loading(config)]
    if base_body is not None:
        kept = f" ({', '.join(carried)} carried into this card's metadata)" if carried else ""
        lines += ["## Card of the base model", "", f"The base model's own card (its README.md), unchanged{kept}.",
                  "", _BASE_MARKER]
        if front:
            lines += [_FM_OPEN + front + ("" if front.endswith(("\n", "\r")) else "\n") + _FM_CLOSE.rstrip("\n")]
        body = "\n".join(lines) + "\n" + base_body
    else:
        body = "\n".join(lines) + "\n"
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _summary(record: dict, base: str, revision: str | None) -> list[str]:
    source, layers = record["source"], record.get("layers") or {}
    n, k = source.get("num_experts"), record.get("num_experts")
    width_in, width_out = source.get("intermediate_size"), record.get("intermediate_size")
    link = f"[`{base}`](https://huggingface.co/{base})" if "/" in base else f"`{base}`"
    at = f" (revision `{revision}`)" if revision else ""
    recipe = f", recipe `{record['recipe']}`" if record.get("recipe") else ""
    width = f", expert width {width_in} -> {width_out}" if width_in != width_out else ""
    return [f"# {base}: {k} of {n} routed experts per MoE layer", "",
            f"{link}{at} with each of its {len(layers)} MoE layers cut from {n} to {k} routed experts{width} by "
            f"dern-stream {record.get('dern_stream_version')} (method `{record.get('method')}`{recipe}), out of "
            "core and without retraining. The tensors outside the routed experts and their routers are the base "
            "model's (`dern-stream verify DIR --against BASE` checks it). `dern_stream.json` beside this card "
            "records the whole run; `dern-stream verify DIR` checks every byte against the checksums it holds.",
            ""]


def _options(record: dict) -> list[str]:
    rows = [f"| `{_cell(k)}` | `{_cell(json.dumps(v))}` |" for k, v in (record.get("options") or {}).items()]
    lines = ["## Method and options", "", "| option | value |", "|---|---|", *rows, ""]
    layers = (record.get("layers") or {}).values()
    sources = sorted({_IMPORTANCE.get(r.get("importance_source"), str(r.get("importance_source"))) for r in layers})
    tokens = max((r.get("calibration_tokens") or 0 for r in layers), default=0)
    provenance = (record.get("reproduce") or {}).get("calibration_provenance") or {}
    if tokens:
        text = str(provenance.get("source") or "")
        kind, _, where = text.partition(":")
        origin = f" of {kind} `{Path(where).name if kind == 'text' else where}`" if where else ""
        lines += [f"Expert importance: {', '.join(sources)}, from up to {tokens:,} calibration tokens per MoE "
                  f"layer{origin} (`dern-stream dump`).", ""]
    else:
        lines += [f"Expert importance: {', '.join(sources)} (no calibration data).", ""]
    return lines


def _parameters(record: dict) -> list[str]:
    counts = record.get("parameters")
    lines = ["## Parameters", ""]
    if not isinstance(counts, dict):
        return lines + ["Not recorded: dern_stream.json was written by a dern-stream that did not count them.", ""]
    before, after = counts["source"], counts["output"]
    source = record["source"]
    lines += ["| | base model | this model | change |", "|---|---:|---:|---:|"]
    for label, key in (("total", "total"), ("routed experts", "routed_experts")):
        a, b = before[key], after[key]
        lines.append(f"| {label} | {_count(a)} | {_count(b)} | {(b - a) / a:+.1%} |" if a else
                     f"| {label} | {_count(a)} | {_count(b)} | |")
    lines += [f"| routed experts per MoE layer | {source.get('num_experts')} | {record.get('num_experts')} | |",
              f"| expert intermediate size | {source.get('intermediate_size')} | {record.get('intermediate_size')} | |",
              "", "Counted from the safetensors headers: every stored value, as transformers holds the weights "
              "unquantized (MXFP4 blocks two values a byte; quantization scales not counted); a stored buffer "
              "such as DeepSeek-V3's score-correction bias counts too.", ""]
    return lines


def _kept(record: dict) -> list[str]:
    layers = record.get("layers") or {}
    lines = ["## Kept experts", "", "Expert j of a MoE layer here is the base model's expert `kept[j]` (original "
             "indices); `rebuilt` experts took in neurons of dropped ones, the others are the base model's as "
             "they were.", "", "| layer | kept (base model indices) | rebuilt | segments reassigned |",
             "|---:|---|---:|---:|"]
    for index in sorted(layers, key=int):
        rec = layers[index]
        lines.append(f"| {index} | {', '.join(map(str, rec.get('kept') or []))} | "
                     f"{len(rec.get('rebuilt_experts') or [])} | {rec.get('segments_reassigned', '')} |")
    return [*lines, ""]


def _evaluations(evaluations: list[dict]) -> list[str]:
    tasks = [e for e in evaluations if e.get("kind") == "tasks"]
    return [*_text_evaluations([e for e in evaluations if e.get("kind") != "tasks"]), *_task_tables(tasks)]


def _task_tables(evaluations: list[dict]) -> list[str]:
    """One table per `eval --tasks` report: each metric, with the reference's and the paired difference."""
    lines = []
    for e in evaluations:
        against = e.get("reference_model")
        lines += ["## Task scores" if not lines else "", "",
                  f"lm-evaluation-harness scores of {_cell(e['model'])}" + (f" against {_cell(against)}" if against
                  else "") + ", from `dern-stream eval --tasks` (given to `dern-stream card --eval`)"
                  + ("; the difference is this model's score less the reference's, with its standard error "
                     "paired by item." if against else "."), ""]
        if against:
            lines += ["| task | metric | score | reference | difference | ± paired SE | items |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {_cell(r['task'])} | {_cell(r['metric'])} | {_num(r['value'], '.4f')} | "
                      f"{_num(r['reference'], '.4f')} | {_num(r['difference'], '+.4f')} | "
                      f"{_num(r['difference_stderr'], '.4f')} | {_num(r['items'], ',')} |" for r in e["scores"]]
        else:
            lines += ["| task | metric | score | ± stderr |", "|---|---|---:|---:|"]
            lines += [f"| {_cell(r['task'])} | {_cell(r['metric'])} | {_num(r['value'], '.4f')} | "
                      f"{_num(r['stderr'], '.4f')} |" for r in e["scores"]]
    return [*lines, ""] if lines else []


def _text_evaluations(evaluations: list[dict]) -> list[str]:
    if not evaluations:
        return []
    lines = ["## Evaluation", "", "Results of `dern-stream eval --json` (given to `dern-stream card --eval`). "
             "Perplexity is next-token perplexity over the tokens shown, of the text given to `eval` (the "
             "report does not name it); with a reference, the reference's perplexity on the same tokens, the KL "
             "divergence of the model's next-token distribution from the reference's (nats per token, mean and 99th "
             "percentile) and the share of positions where both predict the same token; the MoE-layer error is the "
             "relative L2 error of each MoE block's output against the reference's, on a calibration dump's "
             "inputs.", "",
             "| model | perplexity | tokens | NLL per token | reference perplexity | KL mean / p99 | top-1 agreement "
             "| mean MoE-layer error | against | device |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for e in evaluations:
        measured = e.get("tokens") is not None
        ppl = _num(e.get("perplexity"), ".4f", "inf" if measured else "")
        kl = f"{_num(e.get('kl_mean'), '.5f')} / {_num(e.get('kl_p99'), '.5f')}" if e.get("kl_mean") is not None else ""
        top1 = f"{e['top1_agreement']:.2%}" if e.get("top1_agreement") is not None else ""
        lines.append(f"| {_cell(e['model'])} | {ppl} | {_num(e.get('tokens'), ',')} | "
                     f"{_num(e.get('nll_per_token'), '.5f')} | {_num(e.get('reference_perplexity'), '.4f')} | {kl} | "
                     f"{top1} | {_num(e.get('mean_rel_l2'), '.6f')} | "
                     f"{_cell(e.get('reference_model') or '')} | {_cell(e.get('device') or '')} |")
    with_layers = [e for e in evaluations if e.get("layer_errors")]
    if with_layers:
        layers = sorted({err["layer"] for e in with_layers for err in e["layer_errors"]})
        per = [{err["layer"]: err["rel_l2"] for err in e["layer_errors"]} for e in with_layers]
        lines += ["", "MoE block output error per layer (relative L2):", "",
                  "| layer | " + " | ".join(_cell(f"{e['model']} vs {e.get('reference_model')}")
                                          for e in with_layers) + " |",
                  "|---:|" + "---:|" * len(with_layers)]
        lines += [f"| {i} | " + " | ".join(_num(p.get(i), ".6f") for p in per) + " |" for i in layers]
    return [*lines, ""]


def _notes(record: dict) -> list[str]:
    notes = [n for n in record.get("config_notes") or [] if isinstance(n, str) and n != BASE_CARD_NOTE]
    return ["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []


def _loading(config: dict) -> list[str]:
    remote = ", trust_remote_code=True" if config.get("auto_map") else ""
    return ["## How to load", "", "An ordinary transformers checkpoint with fewer experts (config.json says how "
            "many):", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("path/or/repo-id/of/this/model", dtype="auto"{remote})',
            f'tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id/of/this/model"{remote})', "```", ""]


def _output_record(root: Path) -> dict:
    """dern_stream.json of a complete rewrite output, unchanged since it was written; one line otherwise."""
    path = root / AUDIT_NAME
    if not path.is_file():
        raise DernError(f"{root} is not the output of a dern-stream rewrite (it has no {AUDIT_NAME})")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DernError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None
    sums = record.get("checksums") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("layers"), dict)
            and isinstance(record.get("source"), dict)):
        raise DernError(f"{path} is not the record of a dern-stream rewrite (no layers and source)")
    if not (isinstance(sums, dict) and sums.get("algorithm") == CHECKSUM and isinstance(sums.get("files"), dict)):
        raise DernError(f"{path} records no checksums of the files written (dern-stream 0.1 did not): rewrite "
                        "again with this version to get a model card")
    if record.get("record_checksum") != record_checksum(record):
        raise DernError(f"{path} was changed after dern-stream wrote it (its record_checksum differs); card does not "
                        "vouch for the change: run `dern-stream verify`, or rewrite again")
    return record


def _read_config(root: Path) -> dict:
    try:
        config = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        raise DernError(f"{root} has no config.json: not a complete rewrite output") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DernError(f"{root / 'config.json'} cannot be read as JSON ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise DernError(f"{root / 'config.json'} is not a JSON object")
    return config


def _current_card(readme: Path, recorded: str | None) -> bytes | None:
    """OUT/README.md's bytes (None when there is none), refused when dern-stream did not write it."""
    if not os.path.lexists(readme):
        return None
    if readme.is_symlink() or not readme.is_file():
        raise DernError(f"{readme} is not a plain file as dern-stream writes them; move it away")
    if recorded is None:
        raise DernError(f"{readme} was not written by dern-stream ({AUDIT_NAME} has no checksum of it); "
                        "card does not overwrite it: move it away")
    return readme.read_bytes()


def _evaluation(path: Path, root: Path, base_model: str) -> dict:
    """An `eval --json` report's results, checked, with the model they are of: this model, the base
    model, or another checkpoint by name."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise DernError(f"{arg('evals', str(path))}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DernError(f"{arg('evals', str(path))} cannot be read as JSON ({type(e).__name__})") from None
    if isinstance(report, dict) and report.get("format") == TASK_EVAL_FORMAT:
        return _task_evaluation(report, path, root, base_model)
    if not isinstance(report, dict) or report.get("format") != EVAL_FORMAT:
        raise DernError(f"{arg('evals', str(path))} is not an eval report, the JSON file `dern-stream eval` writes "
                        f"(its format is neither {EVAL_FORMAT} nor {TASK_EVAL_FORMAT})")
    numbers = ("perplexity", "nll_per_token", "mean_rel_l2", "reference_perplexity", "kl_mean", "kl_p99",
               "top1_agreement")
    valid = (isinstance(report.get("checkpoint"), str)
             and all(report.get(k) is None or _is_number(report[k]) for k in numbers)
             and (report.get("tokens") is None or type(report["tokens"]) is int)
             and isinstance(report.get("reference"), str | None) and isinstance(report.get("device"), str | None)
             and isinstance(report.get("layer_errors"), list)
             and all(isinstance(e, dict) and type(e.get("layer")) is int and _is_number(e.get("rel_l2"))
                     for e in report["layer_errors"]))
    if not valid:
        raise DernError(f"{arg('evals', str(path))}: not a complete eval report (checkpoint, perplexity, tokens, "
                        "layer_errors)")
    result = {k: report.get(k) for k in _EVAL_FIELDS}
    result["model"] = _which_model(report["checkpoint"], root, base_model)
    if report.get("reference") is not None:
        result["reference_model"] = _which_model(report["reference"], root, base_model)
    return result


_SCORE_FIELDS = ("task", "metric", "value", "stderr", "reference", "difference", "difference_stderr", "items")


def _task_evaluation(report: dict, path: Path, root: Path, base_model: str) -> dict:
    """An `eval --tasks --json` file's score table, checked, with the models it is of."""
    scores = report.get("scores")
    valid = (isinstance(report.get("checkpoint"), str) and isinstance(report.get("reference"), str | None)
             and isinstance(scores, list) and scores
             and all(isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("metric"), str)
                     and all(r.get(k) is None or _is_number(r[k]) for k in _SCORE_FIELDS[2:]) for r in scores))
    if not valid:
        raise DernError(f"{arg('evals', str(path))}: not a complete report of eval's {arg('tasks')} "
                        "(checkpoint, scores)")
    result = {"kind": "tasks", "scores": [{k: r.get(k) for k in _SCORE_FIELDS} for r in scores],
              "model": _which_model(report["checkpoint"], root, base_model)}
    if report.get("reference") is not None:
        result["reference_model"] = _which_model(report["reference"], root, base_model)
    return result


def _which_model(checkpoint: str, root: Path, base_model: str) -> str:
    if Path(checkpoint).expanduser().resolve() == root:
        return "this model"
    name = model_name(checkpoint)[0]
    return f"base model ({base_model})" if name == base_model else name


def _split_front_matter(text: str) -> tuple[str, str]:
    """(front matter block with its `---` lines, the rest), as the Hub splits a card; ("", text) without one."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.match(text)
    return (text[:match.end()], text[match.end():]) if match else ("", text)


def _front_matter_data(front: str) -> dict:
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.match(front)
    try:
        data = yaml.safe_load(match.group(2)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # any bytes of the base card survive exactly


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _num(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f}{unit})"
    return f"{n:,}"
