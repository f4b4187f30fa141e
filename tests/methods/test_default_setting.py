"""What DERN runs without a recipe (docs/method.md, "Recipes"): the paper's method with its own k-means start, no
router transfer and the down-projection refit, which is left out, with a note, where it cannot run; baselines run as
their authors run them; `--recipe paper` is the paper's method."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import dern_stream
from dern_stream.cli import main
from dern_stream.options import RECIPES, RewriteOptions


def _record(out) -> dict:
    return json.loads((out / "dern_stream.json").read_text())


def test_the_default_bundles_the_down_refit_for_dern_only():
    default = RewriteOptions.build(4)
    assert (default.recipe, default.refit, default.kmeans_init, default.router_transfer) == ("default", True, "own",
                                                                                            False)
    paper = RewriteOptions.build(4, recipe="paper")
    assert paper == RewriteOptions(experts=4, recipe="paper")  # the field defaults: the paper's DERN
    for baseline in ("prune", "reap", "msmoe", "hcsmoe"):
        options = RewriteOptions.build(4, method=baseline)
        assert options.recipe is None and not options.refit, baseline
    # A value given beside the default is the caller's, and stays so (no note leaves it out).
    given = RewriteOptions.build(4, refit=False, kmeans_init="gate-linf")
    assert (given.refit, given.kmeans_init, given.router_transfer) == (False, "gate-linf", False)
    assert RewriteOptions.build(4, importance="router-norm", refit=True).refit


def test_without_a_dump_the_default_leaves_its_refit_out_and_says_so(build, tmp_path):
    built = build("mixtral")
    summary = dern_stream.rewrite(built.model_dir, tmp_path / "out", experts=4, importance="router-norm",
                                  progress=False)
    assert any("the default setting's down-projection refit is left out: there is no calibration dump" in note
               for note in summary.notes)
    options = _record(tmp_path / "out")["options"]
    assert (options["recipe"], options["refit"], options["kmeans_init"]) == ("default", False, "own")
    plan = dern_stream.plan(built.model_dir, experts=4, progress=False)  # plan without --calib: router norm too
    assert any("refit is left out" in note for note in plan.notes)
    asked = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(tmp_path / "asked"), "--experts", "4",
                                      "--importance", "router-norm", "--refit"])
    assert asked.exit_code == 2 and "needs the layers' cached inputs" in asked.output


def test_on_experts_with_biases_the_default_runs_without_its_refit(build, tmp_path):
    """gpt-oss's experts have biases, which the least-squares refit does not model: the default runs the rest of
    itself with a note, where an explicit --refit is refused."""
    built = build("gpt_oss")
    summary = dern_stream.rewrite(built.model_dir, tmp_path / "out", experts=2, calib=built.calib, progress=False)
    assert any("refit is left out: it does not model gpt_oss's expert biases" in n for n in summary.notes)
    assert _record(tmp_path / "out")["options"]["refit"] is False
    with pytest.raises(dern_stream.DernError, match="refit does not model gpt_oss's expert biases"):
        dern_stream.rewrite(built.model_dir, tmp_path / "asked", experts=2, calib=built.calib, refit=True,
                            progress=False)


def test_the_default_is_closer_to_the_original_than_the_paper_and_pruning(build, tmp_path):
    """On held-out inputs (a dump of other token ids than the one fitted on), the default's layers are closer to
    the original's than the paper's DERN and than pruning, each measured by `eval --reference`; the summary says
    which setting ran and the error the refit left."""
    from dern_stream.tiny_models import calibration_tokens

    built = build("qwen2_moe")
    heldout = tmp_path / "heldout.zarr"
    ids = calibration_tokens(built.config["vocab_size"], sequences=16, length=128, seed=99)
    dern_stream.dump(built.model_dir, heldout, tokens=ids, seq_len=128, progress=False)
    errors = {}
    for label, options in (("default", {}), ("paper", {"recipe": "paper"}), ("prune", {"method": "prune"})):
        out = tmp_path / label
        summary = dern_stream.rewrite(built.model_dir, out, experts=2, calib=built.calib, progress=False,
                                      **options)
        report = dern_stream.evaluate(out, reference=built.model_dir, calib=heldout, progress=False)
        errors[label] = sum(e.rel_l2 for e in report.layer_errors) / len(report.layer_errors)
        if label == "default":
            assert str(summary).splitlines()[0].endswith("by dern (recipe default)")
            error, unfitted = summary.output_error
            assert error < unfitted
    assert errors["default"] < errors["paper"] and errors["default"] < errors["prune"], errors


def test_the_help_and_the_record_name_the_default():
    result = CliRunner().invoke(main, ["rewrite", "--help"], terminal_width=200)
    assert "'default', what DERN runs without one, is --kmeans-init own --no-router-transfer --refit" \
        in " ".join(result.output.split())
    assert RECIPES["default"] == dict(kmeans_init="own", router_transfer=False, refit=True)
