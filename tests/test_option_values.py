"""Every option is validated, NaN and infinite floats included: on the command line one `error:` line,
exit status 2, nothing written; through the Python API a one-line DernError, never another exception."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, file_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from dern_stream.cli import main
from dern_stream.errors import DernError
from dern_stream.options import RewriteOptions

REWRITE = {
    "alpha NaN": (["--alpha", "nan"], "--alpha must lie in [0, 1], got nan"),
    "alpha inf": (["--alpha", "inf"], "--alpha must lie in [0, 1], got inf"),
    "refit-ridge NaN": (["--refit", "--refit-ridge", "nan"], "--refit-ridge must be a finite number of at least 0"),
    "refit-ridge inf": (["--refit", "--refit-ridge", "inf"], "--refit-ridge must be a finite number of at least 0"),
    "refit-ridge negative": (["--refit", "--refit-ridge", "-1"], "--refit-ridge must be a finite number"),
    "alpha-candidates NaN": (["--alpha-candidates", "1,nan"], "--alpha-candidates must be comma-separated numbers"),
    "alpha-candidates empty": (["--alpha-candidates", ","], "--alpha-candidates must be comma-separated numbers"),
    "kmeans-iters 0": (["--kmeans-iters", "0"], "--kmeans-iters must be an integer of at least 1, got 0"),
    "fit-tokens 0": (["--refit", "--fit-tokens", "0"], "--fit-tokens must be an integer of at least 1, got 0"),
    "intermediate-size 0": (["--intermediate-size", "0"], "--intermediate-size must be an integer of at least 1"),
    "refit-group 0": (["--refit-steps", "5", "--refit-group", "0"], "--refit-group must be an integer of at least 1"),
    "refit-group alone": (["--refit-group", "4"], "--refit-group 4 changes nothing without --refit-steps"),
    "max-shard-size 0": (["--max-shard-size", "0"], "size must be positive"),
    "max-shard-size NaN": (["--max-shard-size", "nanGB"], "cannot read size 'nanGB'"),
    "max-shard-size negative": (["--max-shard-size", "-5MB"], "cannot read size '-5MB'"),
    "device": (["--device", "tpu"], "--device tpu is not a device name"),
    "device meta": (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
}


@pytest.mark.parametrize("case", list(REWRITE))
def test_bad_rewrite_option(case, build, tmp_path):
    args, message = REWRITE[case]
    built = build("mixtral")
    before = {"src": file_bytes(built.model_dir), "calib": file_bytes(built.calib)}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(out), "--experts", "4",
                                       "--calib", str(built.calib), "-q", *args])
    assert_clean_failure(result, out, message)
    assert {"src": file_bytes(built.model_dir), "calib": file_bytes(built.calib)} == before


TEXT_OPTIONS = {
    "num-tokens 0": (["--num-tokens", "0"], "--num-tokens must be an integer of at least 1, got 0"),
    "seq-len 1": (["--seq-len", "1"], "--seq-len must be an integer of at least 2, got 1"),
    "batch-size 0": (["--batch-size", "0"], "--batch-size must be an integer of at least 1, got 0"),
    "dtype": (["--dtype", "float8"], "--dtype float8: use auto, float32, bfloat16 or float16"),
    "device": (["--device", "tpu"], "--device tpu is not a device name"),
    "device meta": (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
}


@pytest.mark.parametrize("command", ["dump", "eval"])
@pytest.mark.parametrize("case", list(TEXT_OPTIONS))
def test_bad_dump_and_eval_option(command, case, build, tmp_path):
    args, message = TEXT_OPTIONS[case]
    built = build("mixtral")
    text = built.model_dir.parent / "corpus.txt"
    out = tmp_path / "dump"
    target = [str(out)] if command == "dump" else ["--json", str(tmp_path / "eval.json")]
    before = file_bytes(built.model_dir)
    result = CliRunner().invoke(main, [command, str(built.model_dir), *target, "--text", str(text), "-q", *args])
    assert_clean_failure(result, out, message)
    assert file_bytes(built.model_dir) == before and list(tmp_path.iterdir()) == []


_ANY = (st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=6) | st.lists(st.floats(allow_nan=True), max_size=3))
_FIELDS = ("method", "alpha", "sim_components", "kmeans_iters", "intermediate_size", "importance", "router_transfer",
           "kmeans_init", "alpha_candidates", "refit", "refit_ridge", "fit_tokens", "device", "max_shard_size",
           "refit_router", "holdout", "sequential", "sequential_target", "refit_steps", "groups", "refit_group")


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(-2, 10), _ANY), st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=4),
       st.sampled_from([None, "best", "paper", "worst"]))
def test_any_option_values_give_valid_options_or_one_line(experts, given_values, recipe):
    try:
        options = RewriteOptions.build(experts, recipe, **given_values)
    except DernError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert type(options.experts) is int and options.experts >= 1
    assert isinstance(options.alpha, (int, float)) and 0.0 <= options.alpha <= 1.0
    assert math.isfinite(options.refit_ridge) and options.refit_ridge >= 0
    assert type(options.kmeans_iters) is int and options.kmeans_iters >= 1
    assert type(options.fit_tokens) is int and options.fit_tokens >= 1
    assert type(options.max_shard_size) is int and options.max_shard_size >= 1
    assert options.alpha_candidates is None or all(0.0 <= a <= 1.0 for a in options.alpha_candidates)
    assert isinstance(options.refit, bool) and isinstance(options.router_transfer, bool)
    assert isinstance(options.refit_router, bool) and isinstance(options.sequential, bool)
    assert isinstance(options.holdout, float) and 0.0 <= options.holdout <= 0.5
    assert options.sequential_target in ("layer", "model")
    assert type(options.refit_steps) is int and options.refit_steps >= 0
    assert options.groups in ("keep", "auto", "collapse")
    assert options.refit_group is None or (type(options.refit_group) is int and options.refit_group >= 1
                                           and options.refit_steps > 0)
    assert options.uses_layer_outputs or not (options.sequential or options.holdout)
