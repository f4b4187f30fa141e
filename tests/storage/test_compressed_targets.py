"""The quantization_config matching dern-stream writes out by hand (so that opening a checkpoint does not import
compressed-tensors and transformers) against the library's own is_match, on the names and entries real configs use."""

from __future__ import annotations

import itertools

import pytest
import torch

from dern_stream.storage.compressed_targets import matched, matches

pytest.importorskip("compressed_tensors")
from compressed_tensors.utils.match import is_match  # noqa: E402

MODULES = [f"model.layers.{i}.{block}.experts.{e}.{proj}" for i in (1, 12) for block in ("mlp", "block_sparse_moe")
           for e in (0, 3, 17) for proj in ("gate_proj", "up_proj", "down_proj", "w1", "w3")]
ENTRIES = ["Linear", "Module", "Embedding", "MoE", "lm_head", "model.layers.1.mlp.experts.3.down_proj",
           "model.layers.1.mlp.experts.3", "layers.1.mlp.experts.3.down_proj", "re:.*experts.*",
           "re:.*mlp\\.experts\\.(3|17)\\..*", "re:model\\.layers\\.(1)\\.mlp\\.experts\\..*", "re:experts",
           "re:.*down_proj$", "re:.*self_attn.*", "re:.*block_sparse_moe.gate$", "re:model.layers.1.mlp.experts.1.*",
           "re:.*\\.w[13]$", "re:(?i).*UP_PROJ"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_entry_names_the_modules_the_library_matches(entry):
    linear = torch.nn.Linear(1, 1, device="meta")
    expected = {m for m in MODULES if is_match(m, linear, entry)}
    assert {m for m in MODULES if matches(m, entry)} == expected
    assert matched([entry], MODULES) == expected


def test_several_entries_name_the_union():
    linear = torch.nn.Linear(1, 1, device="meta")
    for pair in itertools.combinations(ENTRIES, 2):
        assert matched(pair, MODULES) == {m for m in MODULES if is_match(m, linear, pair)}
