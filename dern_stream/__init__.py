"""dern-stream: out-of-core DERN expert pruning and neuron recombination for MoE checkpoints."""

__version__ = "0.2.0"

from .api import RewriteSummary, rewrite  # noqa: E402
from .dump_pipeline import DumpSummary, dump  # noqa: E402
from .errors import DernError  # noqa: E402
from .eval_pipeline import EvalReport, evaluate  # noqa: E402

__all__ = ["DernError", "DumpSummary", "EvalReport", "RewriteSummary", "__version__", "dump", "evaluate", "rewrite"]
