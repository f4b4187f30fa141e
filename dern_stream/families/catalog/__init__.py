"""Every supported family, one module per lineage (families that share an on-disk layout or a router), each module
a tuple FAMILIES of records (record.py). Adding a family: docs/architecture.md, "Adding a family"."""

from __future__ import annotations

import importlib
import pkgutil

from ..record import Family


def all_families() -> tuple[Family, ...]:
    """The records of every module here, module by module."""
    return tuple(family for info in pkgutil.iter_modules(__path__)
                 for family in importlib.import_module(f"{__name__}.{info.name}").FAMILIES)
