"""dern-stream: out-of-core DERN expert pruning and neuron recombination for MoE checkpoints.

The names below load their modules on first use (PEP 562), so `import dern_stream` and the command
line's `--help` do not pay for torch, transformers and zarr."""

from __future__ import annotations

from .lazy_exports import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "CardReport": ".model_card", "card": ".model_card",
    "DernError": ".errors",
    "DumpSummary": ".dump_pipeline", "dump": ".dump_pipeline",
    "EvalReport": ".eval_pipeline", "evaluate": ".eval_pipeline",
    "RewritePlan": ".rewrite_plan",
    "push": ".hub",
    "RewriteSummary": ".api", "plan": ".api", "rewrite": ".api",
    "ReportSummary": ".report", "write_report": ".report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
