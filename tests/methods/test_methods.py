"""Baselines (prune, reap, msmoe, hcsmoe) and the options beyond the paper (own-segment init,
per-layer alpha choice, least-squares refit), checked against transformers' own MoE blocks and
against the error the tool itself reports."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import FAMILIES, decoder_layers, load_model, read_tensors

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main
from dern_stream.experts import forward as moe_forward
from dern_stream.experts.forward import EvenSample, expert_stats, layer_routing, routed_output
from dern_stream.experts.result import kept_stack, prune_layer
from dern_stream.families import family_for
from dern_stream.fit.down_refit import refit_down
from dern_stream.layout.moe_layers import ModelShape, check_moe_layers
from dern_stream.rewriter.layer_io import read_experts, read_layer
from dern_stream.stream.executor import moe_block_of, moe_block_output


def _layer_inputs(built, layer: int) -> torch.Tensor:
    return torch.cat(list(CalibDump(built.calib).chunks(layer)))


def test_even_sample_is_every_stride_th_input_and_keeps_only_those_rows(build):
    """The fit sample collected while the importance pass streams a layer's inputs: evenly spaced
    across chunk boundaries, and holding only its own rows (a strided view would keep every chunk
    it came from alive: the whole layer's inputs in memory)."""
    built = build("mixtral")
    dump = CalibDump(built.calib)
    everything = _layer_inputs(built, 1)
    for limit in (7, 10, everything.shape[0]):
        sample = EvenSample(everything.shape[0], limit)
        # pieces of 50 tokens: the dump reads this tiny layer in one block, and boundaries must not matter
        for _ in sample.watch(piece for chunk in dump.chunks(1) for piece in chunk.split(50)):
            pass
        stride = -(-everything.shape[0] // limit)
        assert torch.equal(sample.tensor(), everything[::stride][:limit])
        if stride > 1:
            assert all(part.untyped_storage().nbytes() == part.nbytes for part in sample.kept)


def _layer_router(ckpt, fam, layer, shape, routing):
    """The layer's routed experts' router rows and bias as the rewrite reads them, and `routing` with the layer's zero
    experts (LongCat-Flash) and router input scale (Gemma 4) where it has them."""
    inputs = read_layer(ckpt, fam, layer, shape, with_experts=False)
    return inputs.router, inputs.bias, inputs.layer_routing(routing)


def _shared_part(block, x: torch.Tensor) -> torch.Tensor:
    """What the family's untouched shared experts add (transformers' own modules)."""
    if hasattr(block, "shared_expert_gate"):
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if hasattr(block, "shared_expert"):  # Llama-4
        return block.shared_expert(x)
    if getattr(block, "shared_experts", None) is not None:
        return block.shared_experts(x)
    if hasattr(block, "shared_mlp"):  # HunYuan
        return block.shared_mlp(x)
    return torch.zeros_like(x)


def _setup(built):
    ckpt = Checkpoint(built.model_dir)
    family = family_for(ckpt.config)
    config = ckpt.config
    shape = ModelShape(family.num_experts(config), config["hidden_size"], family.intermediate_size(config))
    layers = check_moe_layers(ckpt, family, shape)
    return ckpt, family, shape, layers


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_output_matches_the_transformers_moe_block(family, build):
    """The forward the baselines, the choice and the refit rely on equals the real block minus its shared part."""
    built = build(family)
    ckpt, fam, shape, layers = _setup(built)
    routing = layer_routing(fam, ckpt.config, ckpt.config)
    model = load_model(built.model_dir).eval()
    for layer in layers:
        x = _layer_inputs(built, layer.index)
        router, bias, layer_routes = _layer_router(ckpt, fam, layer, shape, routing)
        experts = read_experts(ckpt, fam, layer, shape, torch.device("cpu"))
        ours = routed_output(x, router, bias, layer_routes.before, experts)
        decoder_layer = decoder_layers(model)[layer.index]
        block = moe_block_of(decoder_layer)
        with torch.no_grad():  # (Llama-4's block also returns its router logits; Gemma 4's runs as its layer does)
            out = moe_block_output(decoder_layer, x[None])
            reference = out.reshape(x.shape) - _shared_part(block, x)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_an_experts_rows_computed_a_block_at_a_time_give_the_same_outputs_stats_and_refit(family, build,
                                                                                         monkeypatch):
    """The forwards, statistics and down refit hold one block of an expert's rows at a time, so their memory does
    not grow with the fit sample; with blocks of a few rows the output still equals transformers' block, and the
    statistics and refit equal those computed on all rows at once."""
    built = build(family)
    ckpt, fam, shape, layers = _setup(built)
    out_config, _ = fam.output_config(ckpt.config, 4, None)
    routing = layer_routing(fam, ckpt.config, out_config)
    model = load_model(built.model_dir).eval()
    layer = layers[-1]
    x = _layer_inputs(built, layer.index)
    router, bias, routing = _layer_router(ckpt, fam, layer, shape, routing)
    router, bias = router.float(), bias.float() if bias is not None else None
    experts = read_experts(ckpt, fam, layer, shape, torch.device("cpu"))
    keep = [0, 2, 5, 7]
    kept = kept_stack(experts, prune_layer(router, keep, router.shape[0]))

    def compute():
        y = routed_output(x, router, bias, routing.before, experts)
        stats = expert_stats(x, router, bias, routing.before, experts)
        fitted = refit_down(x, y, router[keep], bias[keep] if bias is not None else None, routing.after, kept, 0.1)[0]
        return y, stats, fitted.down

    whole = compute()
    rows_per_block = 5
    monkeypatch.setattr(moe_forward, "ACTIVATION_BLOCK_BYTES",
                        rows_per_block * 4 * (3 * shape.intermediate + 4 * shape.hidden))
    assert moe_forward.row_block(shape.intermediate, shape.hidden) == rows_per_block
    blocked = compute()
    block = moe_block_of(decoder_layers(model)[layer.index])
    with torch.no_grad():
        out = block(x[None])
        reference = (out[0] if isinstance(out, tuple) else out).reshape(x.shape) - _shared_part(block, x)
    torch.testing.assert_close(blocked[0], reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-5, atol=1e-6)
    for name in ("frequency", "reap", "mean_output"):
        torch.testing.assert_close(getattr(blocked[1], name), getattr(whole[1], name), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(blocked[2], whole[2], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(blocked[2], kept.down.float())  # the refit moved the weights


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_reap_saliency_matches_transformers_experts_and_router(family, build):
    """REAP as its authors' code computes it: mean over routed tokens of the router's softmax probability x
    ||expert output|| (not the renormalised combine weight), each expert's output computed by transformers'
    own expert module and the routing by its own router."""
    built = build(family)
    ckpt, fam, shape, layers = _setup(built)
    routing = layer_routing(fam, ckpt.config, ckpt.config)
    model = load_model(built.model_dir).eval()
    layer = layers[0]
    x = _layer_inputs(built, layer.index)
    stats = expert_stats(x, ckpt.load(fam.router_name(layer.index)), None, routing.before,
                         read_experts(ckpt, fam, layer, shape, torch.device("cpu")))
    block = moe_block_of(decoder_layers(model)[layer.index])
    with torch.no_grad():
        logits, _, index = block.gate(x)
        weights = torch.softmax(logits.float(), dim=-1).gather(1, index)
        reference = []
        for e in range(shape.num_experts):
            out = block.experts(x, torch.full((x.shape[0], 1), e), torch.ones(x.shape[0], 1))
            tok, slot = (index == e).nonzero(as_tuple=True)
            reference.append(float((weights[tok, slot] * out[tok].norm(dim=-1)).mean()) if tok.numel() else 0.0)
    torch.testing.assert_close(stats.reap, torch.tensor(reference, dtype=torch.float64), rtol=1e-4, atol=1e-7)


# One family per distinct path through the baselines: softmax routing, a shared expert, grouped sigmoid routing
# with a correction bias, the sparsemixer, a [1, N] bias, and the three fused layouts (Llama-4's input-scaled
# routing, gpt-oss's biases and activation). Every family's routing and forward are checked against
# transformers above; the baselines use them unchanged.
METHOD_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "phimoe", "ernie4_5_moe", "granitemoe", "llama4_text",
                   "gpt_oss"]


@pytest.mark.parametrize("method", ["reap", "msmoe", "hcsmoe", "prune"])
@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_every_method_loads_back_in_transformers(method, family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, method=method, progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    assert audit["method"] == method
    model = load_model(out)
    with torch.no_grad():
        logits = model(torch.arange(3, 19)[None]).logits
    assert logits.shape[-1] == built.config["vocab_size"] and torch.isfinite(logits).all()
    for layer in audit["layers"].values():
        assert len(layer["kept"]) == 4


def test_hcsmoe_merges_duplicate_experts_into_exactly_their_weights(build, tmp_path):
    """Experts built as four identical pairs: clustering to 4 finds the pairs, and a frequency-weighted
    merge of two identical experts gives back that expert, bit for bit."""
    built = build("mixtral")
    src = tmp_path / "dup"
    model = load_model(built.model_dir)
    with torch.no_grad():
        for layer in decoder_layers(model):
            experts = layer.mlp.experts
            for p in (experts.gate_up_proj, experts.down_proj):
                p[1::2] = p[0::2]
            layer.mlp.gate.weight[1::2] = layer.mlp.gate.weight[0::2]
    model.save_pretrained(src)
    dern_stream.dump(src, tmp_path / "calib.zarr", tokens=torch.randint(3, 256, (8, 32),
                     generator=torch.Generator().manual_seed(0)), seq_len=32, progress=False)
    out = tmp_path / "out"
    dern_stream.rewrite(src, out, experts=4, calib=tmp_path / "calib.zarr", method="hcsmoe", progress=False)
    audit = json.loads((out / "dern_stream.json").read_text())
    before, after = read_tensors(src), read_tensors(out)
    for i, layer in audit["layers"].items():
        assert sorted(t[:2] for t in layer["transfers"]) == [[k + 1, k] for k in layer["kept"]]
        for pos, kept in enumerate(layer["kept"]):
            for w in ("w1", "w2", "w3"):
                name = f"model.layers.{i}.block_sparse_moe.experts.{{}}.{w}.weight"
                assert torch.equal(after[name.format(pos)], before[name.format(kept)])


def test_msmoe_alignment_undoes_neuron_permutations(build, tmp_path):
    """Permuting each expert's neurons does not change the model; M-SMoE aligns neurons before merging,
    so the merged layers' errors on the calibration inputs are unchanged too."""
    built = build("mixtral")
    permuted = tmp_path / "permuted"
    model = load_model(built.model_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in decoder_layers(model):
            experts = layer.mlp.experts
            h = experts.down_proj.shape[-1]
            for e in range(experts.down_proj.shape[0]):
                perm = torch.randperm(h, generator=gen)
                experts.gate_up_proj[e] = experts.gate_up_proj[e][torch.cat([perm, perm + h])]
                experts.down_proj[e] = experts.down_proj[e][:, perm]
    model.save_pretrained(permuted)
    errors = []
    for src in (built.model_dir, permuted):
        out = tmp_path / f"out-{src.name}"
        dern_stream.rewrite(src, out, experts=4, calib=built.calib, method="msmoe", progress=False)
        report = dern_stream.evaluate(out, reference=built.model_dir, calib=built.calib, progress=False)
        errors.append([e.rel_l2 for e in report.layer_errors])
    torch.testing.assert_close(torch.tensor(errors[0]), torch.tensor(errors[1]), rtol=1e-4, atol=1e-6)
    assert min(errors[0]) > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_alpha_choice_and_refit_are_never_worse_than_pruning_on_the_cached_inputs(family, build, tmp_path):
    """With alpha = 1 among the candidates, every layer's error on the calibration inputs is at most
    pruning's; the refit lowers it further. Errors are measured by `evaluate`, not by the rewrite."""
    built = build(family)

    def layer_errors(**kwargs) -> list[float]:
        out = tmp_path / "out"
        dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, overwrite=True, progress=False,
                            **kwargs)
        report = dern_stream.evaluate(out, reference=built.model_dir, calib=built.calib, progress=False)
        return [e.rel_l2 for e in report.layer_errors]

    pruned = layer_errors(method="prune")
    chosen = layer_errors(alpha_candidates="1,0.6,0.3,0", kmeans_init="own")
    # chosen on the rows it is fitted on, as measured here; fewer gradient steps than the recipe's, for time
    refitted = layer_errors(recipe="best", holdout=0.0, refit_steps=25)
    for p, c, r in zip(pruned, chosen, refitted, strict=True):
        assert c <= p + 1e-6
        assert r < c
    out_audit = json.loads((tmp_path / "out" / "dern_stream.json").read_text())
    assert out_audit["recipe"] == "best" and out_audit["options"]["refit"] is True
    for layer in out_audit["layers"].values():
        fit = layer["output_error"]
        chosen_error = min(c.get("error_after_refit", c["error"]) for c in fit["candidates"])
        # then the gradient steps, on the same rows: the layer as written
        assert fit["error"] == fit["error_after_gradient"] < chosen_error and fit["gradient_steps"] == 25


def test_own_init_survives_near_duplicate_experts_where_gate_linf_init_collapses(build, tmp_path):
    """Every expert a copy of expert 0 (an upcycled model before training): all pooled segments move,
    and each kept expert's members are copies of its own neurons. Seeding from the kept expert's own
    segments rebuilds it exactly; the paper's gate-L-inf seeds spend several centroids on the same
    neuron and lose others (method.md, "Beyond the paper")."""
    built = build("mixtral")
    src = tmp_path / "copies"
    model = load_model(built.model_dir)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p[1:] = p[0]
    model.save_pretrained(src)
    errors = {}
    for init in ("own", "gate-linf"):
        out = tmp_path / init
        summary = dern_stream.rewrite(src, out, experts=4, calib=built.calib, kmeans_init=init, progress=False)
        assert summary.segments_reassigned == summary.segments_pooled
        report = dern_stream.evaluate(out, reference=src, calib=built.calib, progress=False)
        errors[init] = max(e.rel_l2 for e in report.layer_errors)
    assert errors["own"] < 1e-5
    assert errors["gate-linf"] > 0.05


def test_recipe_fits_on_up_to_131072_cached_inputs(build, tmp_path):
    """The recipe's fit sample is four times the paper's default (docs/quality.md, "The fit sample"): a dump of more
    than 32768 tokens is used whole, where --fit-tokens given beside the recipe takes that many of its rows."""
    from dern_stream.tiny_models import calibration_tokens

    built = build("mixtral")
    ids = calibration_tokens(built.config["vocab_size"], sequences=260, length=128)
    calib = tmp_path / "calib.zarr"
    dern_stream.dump(built.model_dir, calib, tokens=ids, seq_len=128, progress=False)
    for given, expected in [({}, ids.numel()), ({"fit_tokens": ids.numel() // 2}, ids.numel() // 2)]:
        out = tmp_path / f"out-{expected}"
        dern_stream.rewrite(built.model_dir, out, experts=4, calib=calib, recipe="best", refit=False,
                            refit_router=False, refit_steps=0, alpha_candidates=(1.0,), progress=False, **given)
        record = json.loads((out / "dern_stream.json").read_text())
        assert record["options"]["fit_tokens"] == given.get("fit_tokens", 131072)
        for layer in record["layers"].values():
            fit = layer["output_error"]
            assert fit["fit_tokens"] + fit["held_out_tokens"] == expected
    # With its gradient steps, a dump smaller than the recipe's sample is worth a note before the run.
    small = dern_stream.plan(built.model_dir, experts=4, calib=calib, recipe="best", progress=False)
    assert any(f"holds {ids.numel()} inputs per layer, fewer than --fit-tokens 131072" in n for n in small.notes)
    enough = dern_stream.plan(built.model_dir, experts=4, calib=calib, recipe="best", fit_tokens=ids.numel(),
                              progress=False)
    assert not any("fewer than" in n for n in enough.notes)


def test_recipe_values_can_be_overridden_and_bad_combinations_are_refused(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, recipe="best", refit=False,
                        progress=False)
    options = json.loads((out / "dern_stream.json").read_text())["options"]
    assert options["refit"] is False and options["kmeans_init"] == "own" and options["recipe"] == "best"
    runner = CliRunner()
    base = ["rewrite", str(built.model_dir), str(tmp_path / "x"), "--experts", "4", "--calib", str(built.calib)]
    for extra, message in [
        (["--method", "prune", "--alpha-candidates", "1,0.5"], "--alpha-candidates applies to --method dern only"),
        (["--method", "reap", "--intermediate-size", "16"], "--intermediate-size needs --method dern"),
        (["--alpha-candidates", "1,2"], "--alpha-candidates must be comma-separated numbers in [0, 1]"),
        (["--recipe", "fastest"], "Invalid value for '--recipe'"),
    ]:
        result = runner.invoke(main, base + extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    result = runner.invoke(main, ["rewrite", str(built.model_dir), str(tmp_path / "y"), "--experts", "4",
                                  "--importance", "router-norm", "--method", "msmoe"])
    assert result.exit_code == 2 and "needs the layers' cached inputs" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
