"""The bytes a matrix of commands writes, recorded so that a change meant to keep behaviour can prove it did.

    python benchmarks/output_identity.py --workdir DIR --json before.json      # record
    python benchmarks/output_identity.py --workdir DIR --compare before.json   # record again and compare

The matrix, on tiny random checkpoints built offline with transformers' own classes (`dern_stream.tiny_models`):
- every family: `dump` from the demo text, `rewrite --method prune` and `rewrite` (DERN) to half the experts, and
  `eval` of the DERN output against the input (perplexity, KL, top-1, per-layer error);
- `--recipe best` on mixtral and deepseek_v3;
- FP8 block inputs (deepseek_v3 and qwen3_moe: prune, DERN, DERN with `--output-dtype bf16`) and MXFP4 (gpt-oss:
  prune, DERN, and `eval` of the DERN output);
- on mixtral and deepseek_v3, the other methods (reap, msmoe, hcsmoe) and the fitting options one at a time
  (alpha candidates with the down refit, gradient steps without a held-out share, a narrower width), and on mixtral
  the recipe with `--refit-group`, `--sequential`, `--workers 2` and the `plan --json` record.
Each case records the SHA-256 of every file the command wrote (dern_stream.json and the model card included),
and `eval` its numbers. `--compare` exits 1 and names every case that differs. The families' remote-code
member (`deepseek`) has no transformers class: it is ranked by router norm, without a dump or eval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import dern_stream
from dern_stream.checkpoint.config_view import text_section
from dern_stream.tiny_models import FAMILY_CONFIGS, build_demo, save_deepseek_moe_16b, save_fp8_copy, save_mxfp4_copy

TOKENS, SEQ_LEN = 1024, 64
RECIPE_FAMILIES = ("mixtral", "deepseek_v3")
OPTION_CASES = {  # on RECIPE_FAMILIES
    "reap": dict(method="reap"), "msmoe": dict(method="msmoe"), "hcsmoe": dict(method="hcsmoe"),
    "alphas-refit": dict(alpha_candidates=(1.0, 0.6, 0.2), refit=True),
    "steps": dict(refit_steps=20, fit_tokens=512),
}
MIXTRAL_CASES = {
    "width": dict(intermediate_size=16),
    "best-group": dict(recipe="best", fit_tokens=512, refit_steps=20, refit_group=2),
    "sequential": dict(refit=True, sequential=True),
    "workers": dict(workers=2),
}
FP8_FAMILIES = ("deepseek_v3", "qwen3_moe")
MXFP4_FAMILY = "gpt_oss"


WORKDIR = Path(".")  # where the checkpoints are built: written as WORKDIR into what is hashed (a dump names its text)


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by path relative to it, with the work directory's path written as
    WORKDIR. dern_stream.json and plan.json are hashed without the input files' modification times that their
    resume keys hold (the inputs are built anew at every run)."""
    return {str(p.relative_to(root)): hashlib.sha256(_stable_bytes(p)).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _stable_bytes(path: Path) -> bytes:
    data = path.read_bytes().replace(str(WORKDIR.resolve()).encode(), b"WORKDIR")
    if path.name not in ("dern_stream.json", "plan.json"):
        return data
    record = json.loads(data)
    key = record["reproduce"]["resume_key"] if path.name == "dern_stream.json" else record["run_key"]
    key["source"]["files"] = key["calibration"] = "(input file times)"
    record.pop("record_checksum", None)  # (a checksum of the record, times included)
    return json.dumps(record, sort_keys=True).encode()


def experts_of(family: str) -> int:
    config = FAMILY_CONFIGS.get(family, {})
    for key in text_section(config) or ():  # (a multimodal model's language model)
        config = config[key]
    config = {**config, **config.get("ffn_config", {})}  # (DBRX's experts)
    n = next(config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
             if k in config) if config else 8
    return n // 2


def _rewrite(model: Path, out: Path, **options) -> dict[str, str]:
    dern_stream.rewrite(model, out, progress=False, overwrite=True, device="cpu", **options)
    return file_hashes(out)


def _evaluate(model: Path, reference: Path, text: Path, calib: Path | None) -> dict:
    report = dern_stream.evaluate(model, text=text, num_tokens=TOKENS, seq_len=SEQ_LEN, reference=reference,
                                  calib=calib, device="cpu", progress=False)
    record = asdict(report)
    for key in ("seconds", "checkpoint", "reference", "device"):
        record.pop(key)
    return record


def family_cases(family: str, work: Path) -> dict[str, dict]:
    """The dump, prune, DERN and eval of one family (and the recipe where it is in RECIPE_FAMILIES)."""
    base = work / family
    shutil.rmtree(base, ignore_errors=True)
    k = experts_of(family)
    if family == "deepseek":  # remote code: no transformers class, no forward
        model = save_deepseek_moe_16b(base / "model")
        return {f"{family}/{method}": _rewrite(model, base / method, experts=k, method=method,
                                               importance="router-norm") for method in ("prune", "dern")}
    model = build_demo(base, family)
    calib = base / "calib.zarr"
    dern_stream.dump(model, calib, text=base / "corpus.txt", num_tokens=TOKENS, seq_len=SEQ_LEN, device="cpu",
                     progress=False)
    cases = {f"{family}/dump": file_hashes(calib)}
    for method in ("prune", "dern"):
        cases[f"{family}/{method}"] = _rewrite(model, base / method, experts=k, method=method, calib=calib)
    cases[f"{family}/eval"] = _evaluate(base / "dern", model, base / "heldout.txt", calib)
    if family in RECIPE_FAMILIES:
        cases[f"{family}/best"] = _rewrite(model, base / "best", experts=k, recipe="best", calib=calib,
                                           fit_tokens=512, refit_steps=40)
        for name, options in OPTION_CASES.items():
            cases[f"{family}/{name}"] = _rewrite(model, base / name, experts=k, calib=calib, **options)
    if family == "mixtral":
        for name, options in MIXTRAL_CASES.items():
            cases[f"{family}/{name}"] = _rewrite(model, base / name, experts=k, calib=calib, **options)
        dern_stream.plan(model, experts=k, calib=calib, json_path=base / "plan.json", progress=False, device="cpu")
        cases[f"{family}/plan"] = {"plan.json": hashlib.sha256(_stable_bytes(base / "plan.json")).hexdigest()}
    if family in FP8_FAMILIES:
        fp8 = save_fp8_copy(model, base / "fp8", block=(16, 16))
        for method in ("prune", "dern"):
            cases[f"{family}/fp8-{method}"] = _rewrite(fp8, base / f"fp8-{method}", experts=k, method=method,
                                                       calib=calib)
        cases[f"{family}/fp8-dern-bf16"] = _rewrite(fp8, base / "fp8-bf16", experts=k, calib=calib,
                                                    output_dtype="bf16")
    if family == MXFP4_FAMILY:
        mx = save_mxfp4_copy(model, base / "mxfp4")
        for method in ("prune", "dern"):
            cases[f"{family}/mxfp4-{method}"] = _rewrite(mx, base / f"mxfp4-{method}", experts=k, method=method,
                                                         calib=calib)
        cases[f"{family}/mxfp4-eval"] = _evaluate(base / "mxfp4-dern", mx, base / "heldout.txt", None)
    shutil.rmtree(base)
    return cases


def record(work: Path, families: list[str]) -> dict:
    global WORKDIR
    WORKDIR = work
    torch.set_num_threads(2)  # the output depends on it (dern_stream.json records it): the same in every run
    started = time.perf_counter()
    cases: dict[str, dict] = {}
    for family in families:
        t = time.perf_counter()
        cases.update(family_cases(family, work))
        print(f"{family}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return {"threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1), "cases": cases}


def differences(before: dict, after: dict) -> list[str]:
    out = []
    for case in sorted(set(before) | set(after)):
        if case not in after or case not in before:
            out.append(f"{case}: only in {'the record' if case in before else 'this run'}")
        elif before[case] != after[case]:
            keys = sorted(k for k in set(before[case]) | set(after[case]) if before[case].get(k) != after[case].get(k))
            out.append(f"{case}: {', '.join(keys)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--compare", type=Path, help="a record to compare this run's with")
    parser.add_argument("--families", help="comma-separated (default: every family)")
    args = parser.parse_args()
    families = args.families.split(",") if args.families else [*FAMILY_CONFIGS, "deepseek"]
    result = record(args.workdir, families)
    files = sum(len(v) for v in result["cases"].values())
    print(f"{len(result['cases'])} cases, {files} files and numbers recorded in {result['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())["cases"]
        if args.families:
            before = {k: v for k, v in before.items() if k.split("/")[0] in families}
        diff = differences(before, result["cases"])
        print(f"against {args.compare}: {len(before)} cases, {len(diff)} differ")
        for line in diff:
            print("  " + line)
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
