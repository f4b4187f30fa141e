"""Task scores of two models on the same items, side by side: the difference and its paired standard error.

Pairing by item removes the items' own difficulty from the comparison: the standard error of the mean of
per-item differences is much smaller than that of either score when both models get the same items right.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ScoreRow:
    task: str
    metric: str  # lm-eval's "metric,filter" key
    value: float | None
    stderr: float | None
    reference: float | None = None
    difference: float | None = None  # value - reference
    difference_stderr: float | None = None  # paired over `items`, for metrics that are means of per-item scores
    items: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def score_rows(results: dict, reference: dict | None = None) -> list[ScoreRow]:
    """One row per task and metric of lm-eval's results dict `results` (simple_evaluate's output, with its
    samples when paired differences are wanted), with `reference`'s value beside it when given."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or _number(value) is None:
                continue
            metric, _, filt = key.partition(",")
            stderr = _number(metrics.get(f"{metric}_stderr,{filt}"))
            if reference is None:
                rows.append(ScoreRow(task, key, float(value), stderr))
                continue
            ref = _number(reference["results"].get(task, {}).get(key))
            diff, diff_se, items = (None, None, None) if ref is None else (float(value) - ref, None, None)
            paired = _paired(results.get("samples", {}).get(task), reference.get("samples", {}).get(task), metric,
                             filt)
            if paired is not None and ref is not None:
                diff, diff_se, items = paired
            rows.append(ScoreRow(task, key, float(value), stderr, ref, diff, diff_se, items))
    return rows


def _paired(samples: list[dict] | None, ref_samples: list[dict] | None, metric: str, filt: str
            ) -> tuple[float, float | None, int] | None:
    """(mean of per-item differences, its standard error, items) for a metric whose per-item values are numbers
    (accuracy and the like); None for corpus-level metrics (perplexity) or when the items do not match."""
    if not samples or not ref_samples:
        return None
    mine = _per_item(samples, metric, filt)
    theirs = _per_item(ref_samples, metric, filt)
    if mine is None or theirs is None or mine.keys() != theirs.keys() or not mine:
        return None
    diffs = [mine[k] - theirs[k] for k in sorted(mine)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None, n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n), n


def _per_item(samples: list[dict], metric: str, filt: str) -> dict[int, float] | None:
    values = {}
    for s in samples:
        if s.get("filter", "none") != filt:
            continue
        v = _number(s.get(metric))
        if v is None:
            return None
        values[s["doc_id"]] = v
    return values


def format_rows(rows: list[ScoreRow], name: str, reference_name: str | None = None) -> str:
    """The rows as a plain-text table."""
    def num(v, fmt=".4f"):
        if v is None:
            return ""
        return format(v, fmt if abs(v) < 1e5 or fmt == "d" else fmt.replace(".4f", ".4e"))

    if reference_name is None:
        head = f"{'task':<24} {'metric':<22} {'value':>10} {'± stderr':>10}"
        body = [f"{r.task:<24} {r.metric:<22} {num(r.value):>10} {num(r.stderr):>10}" for r in rows]
        return "\n".join([f"task scores of {name} (lm-evaluation-harness):", head, *body])
    head = (f"{'task':<24} {'metric':<22} {'this':>10} {'reference':>10} {'difference':>11} {'± paired SE':>11} "
            f"{'items':>6}")
    body = [f"{r.task:<24} {r.metric:<22} {num(r.value):>10} {num(r.reference):>10} {num(r.difference, '+.4f'):>11} "
            f"{num(r.difference_stderr):>11} {num(r.items, 'd'):>6}" for r in rows]
    return "\n".join([f"task scores of {name} against the reference {reference_name} (lm-evaluation-harness; "
                      "difference = this - reference, its standard error paired by item):", head, *body])
