"""Optional dependencies, imported only by the commands that need them, with a one-line hint if missing."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from ..errors import DernError, arg


def require_transformers(what: str = "dump and eval need") -> ModuleType:
    """transformers builds the model skeleton and loads tokenizers for `dump`, `eval` and the sequential
    rewrite (not for a plain `rewrite`)."""
    check_transformers(what)
    import transformers

    return transformers


def check_transformers(what: str = "dump and eval need") -> None:
    """A one-line error, without importing it, when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise DernError(f"{what} transformers: pip install 'dern-stream[dump]'")


def require_ray() -> ModuleType:
    """Ray runs the layers of a rewrite as tasks on a cluster (`--ray ADDRESS`)."""
    try:
        import ray
    except ImportError:
        raise DernError(f"{arg('ray')} needs Ray: pip install 'dern-stream[ray]'") from None
    return ray


def require_matplotlib() -> None:
    """matplotlib draws the report's plots (`--report`, `dern-stream report`): installed? (Found, not imported:
    importing it takes a second, and a rewrite checks this before its work.)"""
    if importlib.util.find_spec("matplotlib") is None:
        raise DernError("the report needs matplotlib: pip install 'dern-stream[report]'")
