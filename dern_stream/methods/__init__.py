"""The methods that build a layer's K experts, one module each behind one interface (base.py), found here by their
modules: dern (the default), prune, reap, msmoe, hcsmoe. Torch-free to import: the command line's checks ask it."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from .base import Candidate, LayerWork, Method, layer_candidates

__all__ = ["Candidate", "LayerWork", "Method", "all_methods", "layer_candidates", "method_named", "method_names"]


@cache
def all_methods() -> tuple[Method, ...]:
    """Every method, in listing order: each module of this package but base.py defines one, as METHOD."""
    found = [importlib.import_module(f"{__name__}.{info.name}").METHOD
             for info in pkgutil.iter_modules(__path__) if info.name != "base"]
    return tuple(sorted(found, key=lambda method: method.rank))


def method_names() -> tuple[str, ...]:
    return tuple(method.name for method in all_methods())


def method_named(name: str) -> Method:
    """The method called `name` (options.py has checked that there is one)."""
    return next(method for method in all_methods() if method.name == name)
