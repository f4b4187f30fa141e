"""How much of a configuration's fit is memorised: the rewritten model's next-token KL divergence from the original
on the calibration tokens its fit saw, against calibration tokens it did not see and the held-out split.

    python benchmarks/fit_gap.py [--root DIR] [--fixture mixtral-scratch] [--ratio 0.75]
                                 [--configs "best fit 32768" "best (recipe)"] [--json FILE]

Uses the fixture of benchmarks/quality.py, and its splits' documents in hash order (its --mixed-domains), so that
every set below holds every domain. Each configuration is given a dump of exactly as many calibration tokens
as it fits on (at most quality.py's 131072), so that its fit sees all of them but its held-out blocks. "fit" is the
first 32768 of those tokens; "unseen" the 32768 calibration tokens past quality.py's dump; "held-out" the first
32768 tokens of the held-out split.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fixtures  # noqa: E402
import quality  # noqa: E402

import dern_stream  # noqa: E402

SAMPLE = 32768  # tokens per measured set


def main() -> None:
    args = quality.fixture_parser(__doc__.splitlines()[0], 0.75, ["best fit 32768", "best (recipe)"]).parse_args()
    model = fixtures.build_all(args.root, [args.fixture])[args.fixture]
    tokenizer = fixtures.build_tokenizer(args.root, args.root / "corpus")
    rows = SAMPLE // quality.SEQ_LEN
    calib_all = quality.token_rows(tokenizer, args.root / "corpus/calib.txt", quality.CALIB_TOKENS + SAMPLE,
                                   mixed=True)
    if calib_all.numel() < quality.CALIB_TOKENS + SAMPLE:
        raise SystemExit("the calibration split is too small for an unseen sample past the dump")
    dumped = calib_all[:quality.CALIB_TOKENS // quality.SEQ_LEN]
    sets = {"fit": None, "unseen": calib_all[-rows:],
            "held-out": quality.token_rows(tokenizer, args.root / "corpus/heldout.txt", SAMPLE, mixed=True)}
    keep = max(1, round(quality.expert_count(model) * args.ratio))
    results = []
    with tempfile.TemporaryDirectory(prefix="dern-gap-") as work:
        for label in args.configs:
            options = quality.CONFIGS[label]
            fit_tokens = min(options.get("fit_tokens", quality.CALIB_TOKENS), quality.CALIB_TOKENS)
            ids = dumped[:fit_tokens // quality.SEQ_LEN]
            path = quality.calib_dump_path(args.root, args.fixture, ids.numel(), mixed=True)
            calib = quality.cached_dump(model, path, ids)
            out = Path(work) / "out"
            dern_stream.rewrite(model, out, experts=keep, calib=calib, overwrite=True, progress=False, **options)
            row = {"config": label, "fit_tokens": ids.numel()}
            for name, tokens in sets.items():
                tokens = ids[:rows] if tokens is None else tokens
                report = dern_stream.evaluate(out, tokens=tokens, reference=model, progress=False)
                row[name] = report.kl_mean
                if name == "held-out":
                    row["held-out ppl ratio"] = report.perplexity / report.reference_perplexity
            results.append(row)
            print(f"{label:<20} fit on {ids.numel():>6} tokens: KL on fit tokens {row['fit']:.4f}, unseen calibration "
                  f"tokens {row['unseen']:.4f}, held-out {row['held-out']:.4f} (perplexity x"
                  f"{row['held-out ppl ratio']:.3f} the original's)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"fixture": args.fixture, "experts": keep, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
