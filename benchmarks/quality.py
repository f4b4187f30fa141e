"""Quality of every method, on real trained MoEs, at several keep ratios.

    python benchmarks/quality.py [--fixtures mixtral-scratch ...] [--ratios 0.75 0.5 0.25]
                                 [--json benchmarks/results/quality.json]

For each fixture of benchmarks/fixtures.py (built first if missing), it dumps calibration inputs
from the fixture's `calib` split and, separately, MoE inputs from its `heldout` split. Then, for
each keep ratio and each configuration below, it rewrites the model with dern-stream and reports:
- held-out perplexity (the `heldout` split: never seen by training or calibration), and its ratio
  to the original model's;
- on the same held-out tokens, the KL divergence of the rewritten model's next-token distribution from
  the original's (mean, nats per token) and their top-1 agreement;
- mean per-layer relative L2 error of the MoE block output against the original model, on the
  held-out MoE inputs (so a refit cannot score by memorising the calibration tokens);
- the fraction of the dropped experts' segments that were moved into kept experts (whole merged
  experts count all their segments).
Everything runs through the same out-of-core pipeline a user runs (`dern_stream.rewrite`,
`dern_stream.evaluate`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fixtures  # noqa: E402

import dern_stream  # noqa: E402
from dern_stream.families import family_for  # noqa: E402

CALIB_TOKENS = 131072  # the calibration split's first tokens (--calib-tokens; 32768 until 2026-12-04)
HELDOUT_INPUT_TOKENS = 32768  # held-out MoE inputs for the layer error
EVAL_TOKENS = 65536
SEQ_LEN = fixtures.SEQ_LEN

# name -> rewrite() keyword arguments. The first five are the methods; then options beyond the
# paper, one at a time and combined; "best" is the recommended recipe as shipped.
CONFIGS: dict[str, dict] = {
    "prune": dict(method="prune"),
    "reap": dict(method="reap"),
    "msmoe": dict(method="msmoe"),
    "hcsmoe": dict(method="hcsmoe"),
    # DERN as the paper gives it, then the paper's method with one change (recipe "paper" is the field defaults).
    "dern (paper)": dict(recipe="paper"),
    "dern +own-init": dict(recipe="paper", kmeans_init="own"),
    "dern -transfer": dict(recipe="paper", router_transfer=False),
    "dern +own -transfer": dict(recipe="paper", kmeans_init="own", router_transfer=False),
    "dern alpha-choice": dict(recipe="paper", kmeans_init="own", router_transfer=False,
                              alpha_candidates=(1.0, 0.8, 0.6, 0.4, 0.2)),
    "prune +refit": dict(method="prune", refit=True),
    "dern +refit": dict(recipe="paper", kmeans_init="own", router_transfer=False, refit=True),
    # What DERN runs without a recipe (options.RECIPES["default"], 2026-12-07): the line above, named.
    "default": dict(),
    "best (recipe)": dict(recipe="best"),
    # Quality v2 (issue 19): the 2026-11 recipe, then each new option on top of it, then the sequential fit.
    "best 2026-11": dict(recipe="best", refit_router=False, holdout=0.0, refit_steps=0, groups="keep"),
    "2026-11 +router": dict(recipe="best", holdout=0.0, refit_steps=0, groups="keep"),
    "2026-11 +holdout": dict(recipe="best", refit_router=False, refit_steps=0, groups="keep"),
    "best +sequential": dict(recipe="best", sequential=True, refit_steps=0, groups="keep"),
    "best +sequential model": dict(recipe="best", sequential=True, sequential_target="model", refit_steps=0,
                                   groups="keep"),
    # The recipe before --refit-steps and --groups auto joined it (2026-12-02, morning), and the step count halved.
    "best -steps": dict(recipe="best", refit_steps=0, groups="keep"),
    "best steps 200": dict(recipe="best", refit_steps=200),
    # The recipe with the fit sample it had until 2026-12-04 (before it took --fit-tokens 131072).
    "best fit 32768": dict(recipe="best", fit_tokens=32768),
    # A larger fit sample (with --calib-tokens 262144) and more steps: what closes the gap on unseen text.
    "best fit 262144": dict(recipe="best", fit_tokens=262144),
    "best steps 800": dict(recipe="best", refit_steps=800),
    # The gradient refit moving two kept experts at a time (--refit-group: less memory on large models).
    "best group 2": dict(recipe="best", refit_group=2),
    # Leave-one-out on the recipe as it ships (2026-12-04): which option gives what.
    "recipe -steps": dict(recipe="best", refit_steps=0),
    "recipe -refit": dict(recipe="best", refit=False),
    "recipe -holdout": dict(recipe="best", holdout=0.0),
    "recipe -groups": dict(recipe="best", groups="keep"),
    # Group-limited routing collapsed (DeepSeek-V3-style fixtures only; elsewhere the same as without it).
    "prune +collapse": dict(method="prune", groups="collapse"),
    "best +collapse": dict(recipe="best", groups="collapse"),
}


def token_rows(tokenizer, path: Path, count: int, mixed: bool = False) -> torch.Tensor:
    """The split's documents as [n, SEQ_LEN] rows (BOS/EOS around documents), up to `count` tokens. The split
    holds its domains one after another, so its first tokens are English manual pages; `mixed` takes the
    documents in the order of their SHA-256 instead, every domain spread over the rows."""
    docs = fixtures.documents(path)
    if mixed:
        docs = sorted(docs, key=lambda d: hashlib.sha256(d.encode()).digest())
    stream = fixtures.token_stream(tokenizer, docs)
    rows = min(count, stream.numel()) // SEQ_LEN
    return stream[:rows * SEQ_LEN].view(rows, SEQ_LEN)


def cached_dump(model: Path, path: Path, tokens: torch.Tensor) -> Path:
    if not (path / ".done").exists():
        dern_stream.dump(model, path, tokens=tokens, seq_len=SEQ_LEN, overwrite=True, progress=False)
        (path / ".done").write_text("")
    return path


def expert_count(model: Path) -> int:
    """Routed experts per MoE layer of a fixture, as its family reads config.json."""
    config = json.loads((model / "config.json").read_text())
    return family_for(config).num_experts(config)


def fixture_parser(description: str, ratio: float, configs: list[str]) -> argparse.ArgumentParser:
    """The options of the scripts that measure configurations on one fixture at one ratio (recipe_cost.py,
    fit_gap.py): --root, --fixture, --ratio, --configs (names from CONFIGS) and --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", type=Path, default=fixtures.ROOT)
    parser.add_argument("--fixture", default="mixtral-scratch", choices=list(fixtures.RECIPES))
    parser.add_argument("--ratio", type=float, default=ratio)
    parser.add_argument("--configs", nargs="*", default=configs, choices=list(CONFIGS))
    parser.add_argument("--json", type=Path)
    return parser


def calib_dump_path(root: Path, name: str, tokens: int, mixed: bool = False) -> Path:
    if mixed:
        return root / name / f"calib-mixed-{tokens}.zarr"
    return root / name / ("calib.zarr" if tokens == 32768 else f"calib-{tokens}.zarr")


def run_fixture(name: str, root: Path, ratios: list[float], configs: dict[str, dict], work: Path,
                calib_tokens: int = CALIB_TOKENS, mixed: bool = False) -> dict:
    model = fixtures.build_all(root, [name])[name]
    tokenizer = fixtures.build_tokenizer(root, root / "corpus")
    calib = cached_dump(model, calib_dump_path(root, name, calib_tokens, mixed),
                        token_rows(tokenizer, root / "corpus/calib.txt", calib_tokens, mixed))
    heldout_tokens = token_rows(tokenizer, root / "corpus/heldout.txt", EVAL_TOKENS, mixed)
    heldout_inputs = cached_dump(model, root / name / ("heldout-mixed.zarr" if mixed else "heldout.zarr"),
                                 heldout_tokens[:HELDOUT_INPUT_TOKENS // SEQ_LEN])
    experts = expert_count(model)
    base = dern_stream.evaluate(model, tokens=heldout_tokens, progress=False)
    print(f"\n{name}: {experts} experts, original held-out perplexity {base.perplexity:.3f} "
          f"({base.tokens} tokens)", flush=True)
    out = {"experts": experts, "perplexity": base.perplexity, "tokens": base.tokens, "calib_tokens": calib_tokens,
           "mixed_domains": mixed, "runs": []}
    for ratio in ratios:
        keep = max(1, round(experts * ratio))
        for label, kwargs in configs.items():
            target = work / "out"
            started = time.perf_counter()
            summary = dern_stream.rewrite(model, target, experts=keep, calib=calib, overwrite=True, progress=False,
                                          **kwargs)
            seconds = time.perf_counter() - started
            report = dern_stream.evaluate(target, tokens=heldout_tokens, reference=model, calib=heldout_inputs,
                                          progress=False)
            run = {"config": label, "ratio": ratio, "experts": keep, "perplexity": report.perplexity,
                   "ppl_ratio": report.perplexity / base.perplexity, "kl_mean": report.kl_mean,
                   "kl_p99": report.kl_p99, "top1": report.top1_agreement, "layer_error": report.mean_rel_l2,
                   "reassigned": summary.segments_reassigned / max(1, summary.segments_pooled),
                   "rewrite_seconds": round(seconds, 1)}
            out["runs"].append(run)
            print(f"  {ratio:>4.0%} {label:<22} ppl {run['perplexity']:9.3f} (x{run['ppl_ratio']:.3f})  "
                  f"KL {run['kl_mean']:.4f}  top-1 {run['top1']:6.1%}  err {run['layer_error']:.3f}  "
                  f"moved {run['reassigned']:6.1%}  {seconds:5.1f} s", flush=True)
            shutil.rmtree(target)
    return out


def table(results: dict) -> str:
    """Markdown: one block per fixture, a row per configuration, per ratio ppl (x original) / KL / top-1 / err /
    moved (KL and top-1 where the run measured them)."""
    lines = []
    for name, res in results.items():
        ratios = sorted({r["ratio"] for r in res["runs"]}, reverse=True)
        lines += [f"**{name}** ({res['experts']} experts, original held-out perplexity {res['perplexity']:.2f})", "",
                  "| config | " + " | ".join(f"{r:.0%} kept: ppl (x orig) / KL / top-1 / err / moved" for r in ratios)
                  + " |",
                  "|---|" + "---|" * len(ratios)]
        for label in dict.fromkeys(r["config"] for r in res["runs"]):
            cells = []
            for ratio in ratios:
                run = next((r for r in res["runs"] if r["config"] == label and r["ratio"] == ratio), None)
                if run is None:  # not measured in this run
                    cells.append("-")
                    continue
                kl = f"{run['kl_mean']:.4f} / {run['top1']:.1%}" if run.get("kl_mean") is not None else "- / -"
                cells.append(f"{run['perplexity']:.2f} (x{run['ppl_ratio']:.3f}) / {kl} / {run['layer_error']:.3f} / "
                             f"{run['reassigned']:.0%}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=fixtures.ROOT)
    parser.add_argument("--fixtures", nargs="*", default=list(fixtures.RECIPES), choices=list(fixtures.RECIPES))
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.75, 0.5, 0.25])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS,
                        help="Calibration tokens dumped from the calib split (at most what it holds).")
    parser.add_argument("--mixed-domains", action="store_true",
                        help="Take the calib and held-out splits' documents in hash order, every domain spread "
                             "over the tokens (by default the first tokens are the first domains: token_rows).")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "quality.json")
    parser.add_argument("--report", nargs="*", type=Path,
                        help="Print the table from JSON files of earlier runs (one per fixture is fine), run nothing.")
    args = parser.parse_args()
    if args.report:
        print(table({k: v for f in args.report for k, v in json.loads(f.read_text())["results"].items()}))
        return
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dern-quality-") as work:
        for name in args.fixtures:
            results[name] = run_fixture(name, args.root, args.ratios, {c: CONFIGS[c] for c in args.configs},
                                        Path(work), args.calib_tokens, args.mixed_domains)
    print("\n" + table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "seconds": round(time.perf_counter() - started, 1),
                                     "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    print(f"written: {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
