"""Shared fixtures: tiny real checkpoints built with transformers' own classes, cached per session."""

from __future__ import annotations

import pytest
from helpers import Built

from dern_stream.tiny_models import build_example


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """build(family, **kwargs) -> Built, each distinct request built once per session."""
    cache: dict = {}

    def _build(family: str, **kwargs) -> Built:
        key = (family, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(family)
            cache[key] = Built(*build_example(directory, family, **kwargs))
        return cache[key]

    return _build


