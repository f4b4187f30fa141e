"""The router-row refit (`refit_router`): the compressed routing reproduces the original routing mass of each
kept expert's members, measured on cached inputs the fit did not see; pruning leaves the router as it was."""

from __future__ import annotations

import json

import pytest
import torch

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.experts.result import prune_layer
from dern_stream.families import family_for
from dern_stream.fit.router_refit import membership, refit_router


def _layer(built, index: int):
    ckpt = Checkpoint(built.model_dir)
    family = family_for(ckpt.config)
    router = ckpt.load(family.router_name(index)).float()
    x = torch.cat(list(CalibDump(built.calib).chunks(index)))
    return family, ckpt.config, router, x


def _merged(router: torch.Tensor, h: int):
    """Experts 0..3 kept; 4..7 merged whole into 0..3 (as HC-SMoE merges), so each kept expert stands for two."""
    result = prune_layer(router, [0, 1, 2, 3], router.shape[0])
    result.counts = torch.eye(4, dtype=torch.long) * h
    return result


def _mass(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)


@pytest.mark.parametrize(("family_name", "sigmoid"), [("mixtral", False), ("deepseek_v3", True)])
def test_refit_router_reproduces_the_members_mass_on_unseen_inputs(family_name, sigmoid, build):
    built = build(family_name)
    family, config, router, x = _layer(built, 1)
    h = family.intermediate_size(config)
    result = _merged(router, h)
    fit, unseen = x[: x.shape[0] // 2], x[x.shape[0] // 2:]
    rows = refit_router(fit, router, result, family.make_router(config), h, ridge=0.01)
    a = membership(result, router.shape[0], h, "cpu")
    scores = _mass(unseen.double() @ router.double().T, sigmoid)
    if sigmoid:  # the chance that either member's gate fires
        target = 1 - torch.exp(torch.log1p(-scores) @ a)
    else:  # their summed probability (a softmax over the K kept rows sums to 1)
        target = scores @ a
        target = target / target.sum(dim=-1, keepdim=True)

    def error(r: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(_mass(unseen.double() @ r.double().T, sigmoid) - target))

    before, after = error(result.router), error(rows)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("family_name", ["mixtral", "deepseek_v3"])
def test_refit_router_leaves_a_pruned_router_as_it_was(family_name, build):
    built = build(family_name)
    family, config, router, x = _layer(built, 1)
    result = prune_layer(router, [0, 2, 5, 7], router.shape[0])
    rows = refit_router(x, router, result, family.make_router(config), family.intermediate_size(config), ridge=0.01)
    torch.testing.assert_close(rows, router[[0, 2, 5, 7]], rtol=1e-4, atol=1e-5)


def test_refit_router_in_a_rewrite_is_chosen_per_layer_on_held_out_rows(build, tmp_path):
    """With refit and refit_router, each layer tries both; with a held-out share the choice is made on rows kept
    out of fitting, and the record says so; the output loads in transformers."""
    built = build("qwen2_moe")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, recipe="best", refit_router=True,
                        holdout=0.25, refit_steps=25, progress=False)
    record = json.loads((out / "dern_stream.json").read_text())
    tokens = CalibDump(built.calib).layer(int(next(iter(record["layers"])))).shape[0]
    for layer in record["layers"].values():
        fit = layer["output_error"]
        labels = [c["candidate"] for c in fit["candidates"]]
        assert any(label.endswith("+router") for label in labels)
        assert any(label.endswith("(no refit)") for label in labels)
        assert fit["error_on"] == "held-out rows"
        # a quarter, in blocks spread over the sample (at least 64 of them)
        assert abs(fit["held_out_tokens"] - tokens / 4) <= tokens / 64 + 1
        assert fit["fit_tokens"] == tokens - fit["held_out_tokens"]
        judged = [c.get("error_after_refit", c["error"]) for c in fit["candidates"]]
        assert fit["chosen"] == labels[judged.index(min(judged))]
        # the chosen setting's held-out error, lowered by the gradient steps where any helped
        assert fit["error"] == (fit["error_after_gradient"] if fit["gradient_steps"] else min(judged))
        assert fit["error"] <= min(judged)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(("rows", "share"), [(32768, 0.2), (1000, 0.25), (5, 0.2)])
def test_held_out_rows_are_spread_over_the_sample(rows, share):
    """The calibration text is ordered (documents of one domain after another): held-out rows taken from its end
    would judge every layer on one domain. They are blocks spread over the whole sample, about `share` of it."""
    from dern_stream.fit.rows import FitRows

    order = torch.arange(rows, dtype=torch.float32)[:, None]  # each row's position, as its value
    data = FitRows(order, order, share)
    held = data.judging()[0][:, 0]
    fitting = data.fitting()[0][:, 0]
    assert held.numel() + fitting.numel() == rows and set(held.tolist()).isdisjoint(fitting.tolist())
    assert abs(held.numel() - share * rows) <= max(1, rows / 64)
    if rows >= 1000:
        assert held.min() < rows / 5 and held.max() > 4 * rows / 5
