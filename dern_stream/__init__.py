"""dern-stream: out-of-core DERN expert pruning and neuron recombination for MoE checkpoints."""

__version__ = "0.2.0"

from .api import RewriteSummary, plan, rewrite  # noqa: E402
from .dump_pipeline import DumpSummary, dump  # noqa: E402
from .errors import DernError  # noqa: E402
from .eval_pipeline import EvalReport, evaluate  # noqa: E402
from .rewrite_plan import RewritePlan  # noqa: E402

__all__ = [
    "DernError", "DumpSummary", "EvalReport", "RewritePlan", "RewriteSummary", "__version__", "dump", "evaluate",
    "plan", "rewrite",
]
