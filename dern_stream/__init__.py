"""dern-stream: out-of-core DERN expert pruning and neuron recombination for MoE checkpoints.

The names below load their modules on first use (PEP 562), so `import dern_stream` and the command
line's `--help` do not pay for torch, transformers and zarr."""

from __future__ import annotations

from .runtime.lazy_exports import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "CardReport": ".publish.card", "card": ".publish.card",
    "DernError": ".errors",
    "DumpSummary": ".calib.dump", "dump": ".calib.dump",
    "EvalReport": ".evaluation.evaluation", "evaluate": ".evaluation.evaluation",
    "RewritePlan": ".rewriter.plan",
    "TaskReport": ".evaluation.task_scores", "score_tasks": ".evaluation.task_scores",
    "push": ".publish.hub",
    "RewriteSummary": ".rewriter.execute", "plan": ".api", "rewrite": ".api",
    "ReportSummary": ".publish.report", "write_report": ".publish.report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
