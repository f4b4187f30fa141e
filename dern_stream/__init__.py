"""dern-stream: out-of-core DERN expert pruning and neuron recombination for MoE checkpoints."""

__version__ = "0.1.0"

from .api import RewriteSummary, rewrite  # noqa: E402
from .errors import DernError  # noqa: E402

__all__ = ["DernError", "RewriteSummary", "__version__", "rewrite"]
