"""LongCat-Flash's zero-computation experts: router rows and bias entries with no weights behind them, kept after the
K kept experts' by every rewrite, and routed to in the output as in the input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_clean_failure, edited_copy, read_tensors
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.cli import main
from dern_stream.families import family_for
from dern_stream.stream.executor import moe_block_of


@pytest.mark.parametrize("method", ["prune", "dern"])
def test_zero_experts_are_kept_after_the_kept_experts(method, build, tmp_path):
    built = build("longcat_flash")
    fam = family_for(built.config)
    n, zero = fam.num_experts(built.config), fam.passive_experts(built.config)
    assert zero == 2 and n == 8
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=2, calib=built.calib, method=method, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["zero_expert_num"], config["moe_topk"]) == (2, 2, 3)  # 3 <= 2 + 2
    assert config["num_layers"] == built.config["num_layers"] and "num_hidden_layers" not in config
    src, dst = read_tensors(built.model_dir), read_tensors(out)
    audit = json.loads((out / "dern_stream.json").read_text())
    for i in fam.moe_layers(src):
        router, bias = src[fam.router_name(i)], src[fam.bias_name(i)]
        assert dst[fam.router_name(i)].shape == (2 + zero, router.shape[1])
        assert dst[fam.router_name(i)][2:].equal(router[n:])  # the zero experts' rows, as they were
        assert dst[fam.bias_name(i)].equal(torch.cat([bias[audit["layers"][str(i)]["kept"]], bias[n:]]))

    # The output routes to its zero experts as transformers' own block does, on the input's routing rule: a token
    # whose top-3 over the kept and zero experts includes a zero expert gets that share of its input back.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    block = moe_block_of(model.model.layers[0])
    x = torch.randn(64, built.config["hidden_size"])
    with torch.no_grad():
        _, weights, idx = block.router(x)
        picked_zero = idx >= 2
        assert picked_zero.any()
        alone = block.experts(x, torch.where(picked_zero, 0, idx), weights.masked_fill(picked_zero, 0.0))
        expected = alone + x * weights.masked_fill(~picked_zero, 0.0).sum(-1, keepdim=True)
        torch.testing.assert_close(block(x[None])[0], expected)
    verified = CliRunner().invoke(main, ["verify", str(out), "--against", str(built.model_dir)])
    assert verified.exit_code == 0, verified.output


def test_a_router_with_a_logits_bias_is_refused_in_one_line(build, tmp_path):
    built = build("longcat_flash")
    bad = edited_copy(built.model_dir, tmp_path / "bad", router_bias=True)
    result = CliRunner().invoke(main, ["rewrite", str(bad), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib)])
    assert_clean_failure(result, tmp_path / "out", "router_bias is true (a boolean); expected false")


@pytest.mark.parametrize(("changes", "message"), [
    ({"zero_expert_num": None}, "zero_expert_num is null; expected a non-negative integer"),
    ({"num_hidden_layers": 3}, "num_hidden_layers is 3 but num_layers is 3; longcat_flash derives num_hidden_layers "
                               "as 2 x num_layers"),
])
def test_configs_transformers_would_build_otherwise_are_refused_in_one_line(changes, message, build, tmp_path):
    built = build("longcat_flash")
    bad = edited_copy(built.model_dir, tmp_path / "bad", **changes)
    result = CliRunner().invoke(main, ["rewrite", str(bad), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib)])
    assert_clean_failure(result, tmp_path / "out", message)


def test_num_hidden_layers_twice_num_layers_is_accepted(build, tmp_path):
    built = build("longcat_flash")
    fine = edited_copy(built.model_dir, tmp_path / "fine", num_hidden_layers=2 * built.config["num_layers"])
    dern_stream.rewrite(fine, tmp_path / "out", experts=4, method="prune", importance="router-norm", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
