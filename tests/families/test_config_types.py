"""config.json values of the wrong type or range: one `error:` line and exit status 2 from every command.

One table (family, key, value, message), run against `rewrite`, `dump`, `eval` and `verify` (the last on a
real rewrite output whose config.json is broken the same way); a second table of values only transformers
rejects (dump/eval/verify build the model from config.json); and a property test: random keys of a tiny
checkpoint set to random JSON values, `rewrite` either succeeds or fails with one line, never a traceback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import DELETE, edited_copy, file_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dern_stream.cli import main
from dern_stream.families import FAMILIES
from dern_stream.families.config_check import rules_for

COMMANDS = ("rewrite", "dump", "eval", "verify")

CASES = {
    # name: (family, {key: value}, message on the error line)
    "top-k a string": ("mixtral", {"num_experts_per_tok": "2"},
                       'config.json: num_experts_per_tok is "2" (a string); expected a positive integer'),
    "top-k zero": ("mixtral", {"num_experts_per_tok": 0}, "config.json: num_experts_per_tok is 0; expected a positive"),
    "top-k above the expert count": ("mixtral", {"num_experts_per_tok": 9},
                                     "config.json cannot route: num_experts_per_tok 9 exceeds the "),
    "hidden_size null": ("mixtral", {"hidden_size": None}, "config.json: hidden_size is null; expected a positive"),
    "hidden_size a float": ("mixtral", {"hidden_size": 64.0}, "config.json: hidden_size is 64.0 (a float); expected"),
    "hidden_size negative": ("mixtral", {"hidden_size": -64}, "config.json: hidden_size is -64; expected a positive"),
    "layers a bool": ("mixtral", {"num_hidden_layers": True},
                      "config.json: num_hidden_layers is true (a boolean); expected a positive integer"),
    "layers zero": ("mixtral", {"num_hidden_layers": 0}, "config.json: num_hidden_layers is 0; expected a positive"),
    "expert count a string": ("mixtral", {"num_local_experts": "8"},
                              'config.json: num_local_experts is "8" (a string); expected a positive integer'),
    "expert count null": ("mixtral", {"num_local_experts": None},
                          "config.json: num_local_experts is null; expected a positive integer"),
    "expert width a float": ("mixtral", {"intermediate_size": 32.5},
                             "config.json: intermediate_size is 32.5 (a float); expected a positive integer"),
    "expert width negative": ("mixtral", {"intermediate_size": -1},
                              "config.json: intermediate_size is -1; expected a positive integer"),
    "vocab_size a list": ("mixtral", {"vocab_size": [256]},
                          "config.json: vocab_size is [256] (a list); expected a positive integer"),
    "tie_word_embeddings a string": ("mixtral", {"tie_word_embeddings": "false"},
                                     'tie_word_embeddings is "false" (a string); expected true or false'),
    "rms_norm_eps zero": ("mixtral", {"rms_norm_eps": 0}, "config.json: rms_norm_eps is 0; expected a positive number"),
    "hidden_act a number": ("mixtral", {"hidden_act": 1}, "config.json: hidden_act is 1; expected a string"),
    "model_type a list": ("mixtral", {"model_type": ["mixtral"]},
                          'config.json: model_type is ["mixtral"] (a list); expected a string'),
    "quantization_config a string": ("mixtral", {"quantization_config": "fp8"},
                                     'quantization_config is "fp8" (a string); expected a JSON object or null'),
    "n_group a string": ("deepseek_v3", {"n_group": "2"},
                         'config.json: n_group is "2" (a string); expected a positive integer'),
    "n_group does not divide": ("deepseek_v3", {"n_group": 3},
                                "experts do not split into n_group=3 equal groups"),
    "topk_group null": ("deepseek_v3", {"topk_group": None}, "config.json: topk_group is null; expected a positive"),
    "topk_group above n_group": ("deepseek_v3", {"topk_group": 3},
                                 "config.json cannot route: topk_group=3 is not between 1 and n_group=2"),
    "routed_scaling_factor zero": ("deepseek_v3", {"routed_scaling_factor": 0.0},
                                   "config.json: routed_scaling_factor is 0.0 (a float); expected a positive number"),
    "routed_scaling_factor a string": ("deepseek_v3", {"routed_scaling_factor": "2.5"},
                                       'routed_scaling_factor is "2.5" (a string); expected a positive number'),
    "norm_topk_prob a number": ("deepseek_v3", {"norm_topk_prob": 1},
                                "config.json: norm_topk_prob is 1; expected true or false or null"),
    "first_k_dense_replace negative": ("deepseek_v3", {"first_k_dense_replace": -1},
                                       "first_k_dense_replace is -1; expected a non-negative integer"),
    "n_shared_experts a float": ("deepseek_v3", {"n_shared_experts": 1.5},
                                 "n_shared_experts is 1.5 (a float); expected a non-negative integer"),
    "q_lora_rank zero": ("deepseek_v3", {"q_lora_rank": 0}, "q_lora_rank is 0; expected a positive integer or null"),
    "topk_method unknown": ("deepseek_v2", {"topk_method": "noaux_tc"},
                            'topk_method is "noaux_tc" (a string); expected one of "greedy", "group_limited_greedy"'),
    "group-limited without groups": ("deepseek_v2", {"topk_method": "group_limited_greedy"},
                                     "config.json cannot route: group-limited routing needs positive integers n_group "
                                     "and topk_group, not None, None"),
}

# Right types for the keys dern-stream reads, wrong for transformers' model (dump, eval and verify build it).
TRANSFORMERS_CASES = {
    "unknown hidden_act": ("mixtral", {"hidden_act": "wiggle"}),
    "sliding_window a string": ("mixtral", {"sliding_window": "4096"}),
    "unknown rope_type": ("mixtral", {"rope_parameters": {"rope_type": "sideways"}}),
    "rope_theta a string": ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}),
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def break_config(directory: Path, changes: dict) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def rewritten(build, tmp_path_factory):
    """rewritten(family) -> a real rewrite output (4 experts), made once per module."""
    cache: dict[str, Path] = {}

    def _rewritten(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"{family}-out") / "out"
            result = run("rewrite", build(family).model_dir, out, "--importance", "router-norm", "--experts", 4, "-q")
            assert result.exit_code == 0, result.output
            cache[family] = out
        return cache[family]

    return _rewritten


def invoke(command: str, family: str, changes: dict, build, rewritten, tmp_path):
    """Break a private copy of the command's input; run the command; return the result, the input, the output."""
    built = build(family)
    src = tmp_path / "src"
    shutil.copytree(rewritten(family) if command == "verify" else built.model_dir, src)
    break_config(src, changes)
    text = built.model_dir.parent / "heldout.txt"
    out = tmp_path / "out"
    args = {
        "rewrite": ["rewrite", src, out, "--importance", "router-norm", "--experts", 4, "-q"],
        "dump": ["dump", src, out, "--text", text, "--num-tokens", 256, "--seq-len", 64, "-q"],
        "eval": ["eval", src, "--text", text, "--tokenizer", built.model_dir, "--num-tokens", 256, "--seq-len", 64,
                 "-q"],
        "verify": ["verify", src, "-q"],
    }[command]
    before = file_bytes(src)
    return run(*args), src, out, before


def assert_one_line(result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if "error:" in line] == [lines[-1]], result.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CASES))
def test_wrong_config_value(case, command, build, rewritten, tmp_path):
    family, changes, message = CASES[case]
    result, src, out, before = invoke(command, family, changes, build, rewritten, tmp_path)
    assert_one_line(result, message)
    assert file_bytes(src) == before
    assert not out.exists()


@pytest.mark.parametrize("command", ["dump", "eval", "verify"])
@pytest.mark.parametrize("case", list(TRANSFORMERS_CASES))
def test_config_transformers_cannot_build(case, command, build, rewritten, tmp_path):
    family, changes = TRANSFORMERS_CASES[case]
    result, src, out, before = invoke(command, family, changes, build, rewritten, tmp_path)
    assert_one_line(result, f"config.json cannot build a {family} model in transformers: ")
    assert file_bytes(src) == before
    assert not out.exists()


def test_eval_reads_tokenizer_from_a_broken_config(build, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(build("mixtral").model_dir, src)
    break_config(src, {"num_experts_per_tok": "2"})
    result = run("eval", src, "--text", build("mixtral").model_dir.parent / "heldout.txt", "--num-tokens", 256,
                 "--seq-len", 64, "-q")
    assert_one_line(result, 'config.json: num_experts_per_tok is "2" (a string)')


def test_every_family_has_a_table():
    for family in FAMILIES.values():
        rules = rules_for(family)
        assert {"hidden_size", family.layers_key, *family.top_k_keys, family.intermediate_key} <= set(rules)
        assert set(family.expert_count_keys) <= set(rules)


# --- property test: random keys, random JSON values --------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


def _keys(family: str) -> list[str]:
    return sorted(set(rules_for(FAMILIES[family])) | {"model_type", "n_group", "topk_group", "topk_method",
                                                      "scoring_func", "architectures", "torch_dtype", "dtype"})


@st.composite
def mutations(draw):
    family = draw(st.sampled_from(["mixtral", "deepseek_v3"]))
    keys = draw(st.lists(st.sampled_from(_keys(family)), min_size=1, max_size=3, unique=True))
    return family, {k: draw(st.just(DELETE) | _json) for k in keys}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=mutations())
def test_random_config_values_never_give_a_traceback(build, mutation):
    family, changes = mutation
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        edited_copy(build(family).model_dir, src, **changes)
        before = file_bytes(src)
        result = run("rewrite", src, out, "--importance", "router-norm", "--experts", 4, "-q")
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        assert not crashed and "Traceback" not in result.output, (changes, repr(result.exception), result.output)
        assert result.exit_code in (0, 2), (changes, result.output)
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len([line for line in lines if "error:" in line]) == 1 and lines[-1].startswith("error: "), (
                changes, result.stderr)
            assert not out.exists()
        assert file_bytes(src) == before
