"""End to end for every supported family: rewrite a real tiny checkpoint, load it back with transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import FAMILIES, assert_clean_failure, decoder_layers, load_model, raw_bytes

import dern_stream
from dern_stream.calib import CalibDump
from dern_stream.checkpoint import Checkpoint
from dern_stream.families import family_for


@pytest.mark.parametrize("family", FAMILIES)
def test_rewrite_loads_with_transformers(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    summary = dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=0.2, progress=False)
    assert summary.segments_reassigned > 0  # alpha 0.2 moves segments, so k-means really ran

    model, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits = model(torch.randint(3, 250, (2, 12))).logits
    assert torch.isfinite(logits).all()

    src_cfg, out_cfg = built.config, Checkpoint(out).config  # (a multimodal model's: its language model's)
    fam = family_for(src_cfg)
    present = [k for k in fam.expert_count_keys if k in src_cfg]
    assert present and all(out_cfg[k] == 4 for k in present)
    assert set(out_cfg) == set(src_cfg)  # no second, conflicting expert-count key added
    top_k = src_cfg[fam.top_k_key(src_cfg)]
    assert out_cfg[fam.top_k_key(src_cfg)] == top_k and top_k <= 4
    # (attribute_map: moe_k, moe_topk; Gemma 4 maps none: its top_k_experts)
    text_config = model.config.get_text_config()
    top_k_attribute = "num_experts_per_tok" if hasattr(text_config, "num_experts_per_tok") else fam.top_k_key(src_cfg)
    holder = text_config if hasattr(text_config, top_k_attribute) else text_config.ffn_config  # (DBRX's sub-config)
    assert getattr(holder, top_k_attribute) == top_k

    audit = json.loads((out / "dern_stream.json").read_text())
    moe_layers = fam.moe_layers(Checkpoint(built.model_dir).entries)
    assert moe_layers == CalibDump(built.calib).attrs["moe_layers"]
    assert sorted(map(int, audit["layers"])) == moe_layers
    for rec in audit["layers"].values():
        assert len(rec["kept"]) == 4 and rec["kept"] == sorted(rec["kept"])
        assert len(rec["importance"]) == 8
        # Eq. 1 splits each token's unit weight over its selected experts, so S sums to 1 (less the share of
        # LongCat-Flash's zero experts, which are selected too but never ranked).
        if fam.passive_experts(src_cfg):
            assert 0.0 < sum(rec["importance"]) < 1.0
        else:
            assert sum(rec["importance"]) == pytest.approx(1.0, abs=1e-9)
        assert rec["calibration_tokens"] == 256
        assert sum(t[2] for t in rec["transfers"]) == rec["segments_reassigned"]
    assert audit["options"]["alpha"] == 0.2 and audit["num_experts"] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_untouched_tensors_are_byte_identical(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=3, calib=built.calib, alpha=0.2, progress=False)
    fam = family_for(built.config)
    src, dst = raw_bytes(built.model_dir), raw_bytes(out)
    moe = set(fam.moe_layers(src))
    touched = {n for n in src for i in moe
               if fam.is_layer_expert_tensor(i, n) or n in (fam.router_name(i), fam.bias_name(i))}
    untouched = set(src) - touched
    # Attention, norms, embeddings, dense MLP layers, shared experts and their gates.
    assert any("attn" in n or ".attention." in n for n in untouched)
    assert any("embed" in n or ".wte." in n for n in untouched)  # (DBRX's embedding: transformer.wte)
    if family in ("qwen2_moe",):
        assert any("shared_expert_gate" in n for n in untouched)
    if family.startswith("deepseek"):
        assert any("shared_experts" in n for n in untouched) and any("layers.0.mlp.gate_proj" in n for n in untouched)
    for name in untouched:
        assert dst[name] == src[name], name


def test_deepseek_v3_keeps_group_structure_when_k_fits(build, tmp_path):
    built = build("deepseek_v3")  # 8 experts in n_group=2 groups of 4, topk_group=1
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"]) == (2, 1)
    assert (cfg["scoring_func"], cfg["topk_method"]) == ("sigmoid", "noaux_tc")  # kept for vLLM
    for rec in json.loads((out / "dern_stream.json").read_text())["layers"].values():
        assert sum(e < 4 for e in rec["kept"]) == 2 and sum(e >= 4 for e in rec["kept"]) == 2


def test_deepseek_v3_collapses_groups_when_k_does_not_fit(build, tmp_path):
    built = build("deepseek_v3")
    out = tmp_path / "out"
    summary = dern_stream.rewrite(built.model_dir, out, experts=3, calib=built.calib, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"]) == (1, 1, 3)
    assert any("collapsed" in n for n in summary.notes)
    model = load_model(out)
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits).all()


@pytest.mark.parametrize("groups", ["collapse", "auto"])
def test_deepseek_v3_groups_collapse_on_request_and_keep_the_best_overall(groups, build, tmp_path):
    """Where "keep" keeps the groups (K=4: 2 per group, topk_group 1, top-2): "collapse", and "auto" because the one
    group a token may use would hold just its top-2 (no choice left), keep the K experts with the highest
    routing importance whatever their group, routed over all of them; the output loads and computes."""
    built = build("deepseek_v3")
    out = tmp_path / "out"
    summary = dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, groups=groups,
                                  progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == 2
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"]) == (1, 1, 4)
    # notes are plain text (logged, and written into the audit and the card)
    assert f"group-limited routing collapsed to one group (--groups {groups})" in summary.notes
    for rec in json.loads((out / "dern_stream.json").read_text())["layers"].values():
        ranked = sorted(range(len(rec["importance"])), key=lambda e: -rec["importance"][e])
        assert sorted(rec["kept"]) == sorted(ranked[:4])
    model = load_model(out)
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits).all()


def test_auto_groups_keep_the_groups_where_the_router_still_chooses(build, tmp_path):
    built = build("deepseek_v3")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=6, calib=built.calib, groups="auto", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"]) == (2, 1, 6)  # 3 per group for a top-2


def test_collapsing_groups_changes_nothing_without_grouped_routing(build, tmp_path):
    built = build("mixtral")
    for groups in ("keep", "collapse"):
        dern_stream.rewrite(built.model_dir, tmp_path / groups, experts=4, calib=built.calib, groups=groups,
                            progress=False)
    assert raw_bytes(tmp_path / "keep") == raw_bytes(tmp_path / "collapse")


def test_top_k_is_clipped_to_k(build, tmp_path):
    built = build("mixtral")
    out = tmp_path / "out"
    summary = dern_stream.rewrite(built.model_dir, out, experts=1, calib=built.calib, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (1, 1)
    assert any("clipped" in n for n in summary.notes)
    model = load_model(out)
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits).all()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_intermediate_size_shrinks_every_expert(family, build, tmp_path):
    built = build(family)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, intermediate_size=16, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    assert cfg[key] == 16
    if family == "deepseek_v3":
        assert cfg["n_shared_experts"] == 2  # shared experts keep their width 1 * 32 = 2 * 16
    model, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits).all()


@pytest.mark.parametrize(("family", "dtype"), [(f, torch.bfloat16) for f in FAMILIES] + [("qwen2_moe", torch.float16)])
def test_half_precision_checkpoints(family, dtype, build, tmp_path):
    built = build(family, dtype=dtype)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, alpha=0.2, progress=False)
    src, dst = Checkpoint(built.model_dir), Checkpoint(out)
    fam = family_for(built.config)
    layer = fam.moe_layers(src.entries)[-1]
    new, old = (fam.fused_names(layer)[1],) * 2 if fam.fused else (fam.expert_name(layer, 3, "down"),
                                                                    fam.expert_name(layer, 0, "down"))
    assert dst.entries[new].dtype == src.entries[old].dtype
    assert {e.dtype for e in dst.entries.values()} == {e.dtype for e in src.entries.values()}
    model, info = load_model(out, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits.float()).all()


def test_router_norm_fallback_needs_no_dump(build, tmp_path):
    built = build("olmoe")
    out = tmp_path / "out"
    summary = dern_stream.rewrite(built.model_dir, out, experts=4, importance="router-norm", progress=False)
    assert any("weaker" in n for n in summary.notes)
    audit = json.loads((out / "dern_stream.json").read_text())
    for i, rec in audit["layers"].items():
        assert rec["importance_source"] == "router-norm"
        router = decoder_layers(load_model(built.model_dir))[int(i)].mlp.gate.weight
        expected = sorted(torch.argsort(router.norm(dim=-1), descending=True)[:4].tolist())
        assert rec["kept"] == expected


def test_deepseek_v3_mtp_layer_is_rewritten_and_ranked_by_router_norm(build, tmp_path):
    """A DeepSeek-V3 checkpoint holds its multi-token-prediction block as layer num_hidden_layers, with its
    own routed experts: it must shrink too (the expert count is global), ranked without calibration."""
    from safetensors.torch import load_file, save_file

    built = build("deepseek_v3")
    src = tmp_path / "src"
    shutil.copytree(built.model_dir, src)
    tensors = load_file(src / "model.safetensors")
    last = built.config["num_hidden_layers"] - 1
    mtp = built.config["num_hidden_layers"]
    tensors.update({k.replace(f"layers.{last}.", f"layers.{mtp}."): v.clone()
                    for k, v in tensors.items() if k.startswith(f"model.layers.{last}.")})
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "out"
    summary = dern_stream.rewrite(src, out, experts=4, calib=built.calib, progress=False)
    assert any("multi-token prediction" in n for n in summary.notes)
    audit = json.loads((out / "dern_stream.json").read_text())
    assert audit["layers"][str(mtp)]["importance_source"] == "router-norm"
    assert audit["layers"][str(last)]["importance_source"] == "routing"
    entries = Checkpoint(out).entries
    assert entries[f"model.layers.{mtp}.mlp.gate.weight"].shape == (4, 64)
    assert f"model.layers.{mtp}.mlp.experts.3.up_proj.weight" in entries
    assert f"model.layers.{mtp}.mlp.experts.4.up_proj.weight" not in entries


def test_ernie_shared_experts_keep_their_width(build, tmp_path):
    built = build("ernie4_5_moe")
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, intermediate_size=16, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["moe_num_shared_experts"], cfg["moe_num_experts"]) == (16, 2, 4)
    model, info = load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.isfinite(model(torch.randint(3, 250, (1, 8))).logits).all()


def test_hunyuan_width_change_is_refused_in_one_line(build, tmp_path):
    from click.testing import CliRunner

    from dern_stream.cli import main

    built = build("hunyuan_v1_moe")
    result = CliRunner().invoke(main, ["rewrite", str(built.model_dir), str(tmp_path / "out"), "--experts", "4",
                                       "--calib", str(built.calib), "--intermediate-size", "16"])
    assert_clean_failure(result, tmp_path / "out", "shared MLP")


def test_a_shared_expert_as_wide_as_the_expert_count_is_not_an_expert_dimension(build, tmp_path):
    """GLM-4.5 with 8 routed experts of width 8 and one shared expert of width 8: the shared expert's [d, 8] and [8, d]
    tensors are copied, not refused as unknown per-expert tensors."""
    built = build("glm4_moe", moe_intermediate_size=8)
    out = tmp_path / "out"
    dern_stream.rewrite(built.model_dir, out, experts=4, calib=built.calib, progress=False)
    shared = [n for n in raw_bytes(out) if "shared_experts" in n]
    assert shared and all(raw_bytes(out)[n] == raw_bytes(built.model_dir)[n] for n in shared)
    assert torch.isfinite(load_model(out)(torch.randint(3, 250, (1, 8))).logits).all()
