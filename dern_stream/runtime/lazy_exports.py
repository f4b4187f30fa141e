"""Package names that load their modules on first use (PEP 562): `import dern_stream` and the command line's
checks do not pay for torch, transformers and zarr, which most of the modules need."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> Callable[[str], object]:
    """The `__getattr__` of `package`: name -> its relative module in `exports`, imported when first asked for
    and then kept in the package's `namespace` (later lookups skip this function)."""
    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__
