"""Optional dependencies, imported only by the commands that need them, with a one-line hint if missing."""

from __future__ import annotations

from types import ModuleType

from .errors import DernError, arg


def require_transformers() -> ModuleType:
    """transformers builds the model skeleton and loads tokenizers for `dump` and `eval` (not `rewrite`)."""
    try:
        import transformers
    except ImportError:
        raise DernError("dump and eval need transformers: pip install 'dern-stream[dump]'") from None
    return transformers


def require_ray() -> ModuleType:
    """Ray runs the layers of a rewrite as tasks on a cluster (`--ray ADDRESS`)."""
    try:
        import ray
    except ImportError:
        raise DernError(f"{arg('ray')} needs Ray: pip install 'dern-stream[ray]'") from None
    return ray


def require_matplotlib() -> ModuleType:
    """matplotlib draws the report's plots (`--report`, `dern-stream report`)."""
    try:
        import matplotlib
    except ImportError:
        raise DernError("the report needs matplotlib: pip install 'dern-stream[report]'") from None
    return matplotlib
