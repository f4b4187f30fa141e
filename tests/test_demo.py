"""The demo that README's Set-up builds (`python -m dern_stream.tiny_models demo`): its tokenizer covers any
text, and README's Python example runs on it as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dern_stream.tiny_models import FAMILY_CONFIGS, build_demo, build_model, build_tokenizer, example_text

README = Path(__file__).resolve().parents[1] / "README.md"


VOCAB = build_model("mixtral").config.vocab_size  # every tiny model's


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The demo's tokenizer as the commands load it: saved, then read back by AutoTokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(example_text(20000, seed=1), VOCAB).save_pretrained(path)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def _round_trip(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    return ids


def test_the_demo_tokenizer_has_no_unknown_text(demo_tokenizer):
    for text in ["The quick brown fox", "Hello, World! 42 + x_y = {z}; #tag @you ~ok?", "tabs\tand\nnew  lines ",
                 "".join(map(chr, range(128))), "non-ASCII too: héllo, ✓, 日本"]:
        ids = _round_trip(demo_tokenizer, text)
        assert demo_tokenizer.unk_token_id not in ids and max(ids) < VOCAB, text
    # The text it was trained on takes fewer tokens than bytes: the merges are learned.
    corpus = example_text(300, seed=1)
    assert len(_round_trip(demo_tokenizer, corpus)) < len(corpus.encode()) / 2


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
@example(text="a<unk>b<s>")
def test_any_ascii_text_round_trips_through_the_demo_tokenizer(demo_tokenizer, text):
    # The special tokens' own text ("<unk>") is read as the special token, as in every Hugging Face tokenizer.
    ids = _round_trip(demo_tokenizer, text)
    assert ids.count(demo_tokenizer.unk_token_id) == text.count(demo_tokenizer.unk_token)


@pytest.mark.slow  # a dump, a rewrite and an evaluation of the demo: about half a minute on 2 cores
def test_the_readme_python_example_runs_on_the_demo(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    block = re.search(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M).group(1)
    build_demo(tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert re.search(r"^perplexity \d", printed, re.M) and "MoE block output error against" in printed, printed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "model-4x")
    assert model.config.num_local_experts == 4 < FAMILY_CONFIGS["mixtral"]["num_local_experts"]
