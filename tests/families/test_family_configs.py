"""Config spellings of the newer families: top-k keys, group defaults, ERNIE's layer range, MTP blocks."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import DELETE, assert_clean_failure, edited_copy
from transformers import AutoModelForCausalLM

import dern_stream
from dern_stream.checkpoint import Checkpoint
from dern_stream.cli import main


def _copy(built, tmp_path, **changes):
    return edited_copy(built.model_dir, tmp_path / "in", **changes)


def _rewrite(src, tmp_path, *extra):
    return CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "out"), "--experts", "3",
                                     "--importance", "router-norm", *extra])


@pytest.mark.parametrize("family", ["ernie4_5_moe", "hunyuan_v1_moe"])
def test_both_top_k_keys_are_clipped(family, build, tmp_path):
    built = build(family)
    key = {"ernie4_5_moe": "moe_k", "hunyuan_v1_moe": "moe_topk"}[family]
    src = _copy(built, tmp_path, num_experts_per_tok=2)
    dern_stream.rewrite(src, tmp_path / "out", experts=1, importance="router-norm", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[key] == config["num_experts_per_tok"] == 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_experts_per_tok == 1


def test_top_k_keys_that_disagree_are_one_line(build, tmp_path):
    src = _copy(build("ernie4_5_moe"), tmp_path, num_experts_per_tok=6)
    result = _rewrite(src, tmp_path)
    assert_clean_failure(result, tmp_path / "out", "moe_k is 2 but num_experts_per_tok is 6")


def test_glm4_moe_without_groups_uses_one_group(build, tmp_path):
    src = _copy(build("glm4_moe"), tmp_path, n_group=DELETE, topk_group=DELETE)
    assert _rewrite(src, tmp_path).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.n_group == 1 and torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_ernie_last_layer_index_minus_one(build, tmp_path):
    src = _copy(build("ernie4_5_moe"), tmp_path, moe_layer_end_index=-1)
    assert _rewrite(src, tmp_path).exit_code == 0


def test_mtp_block_is_left_out_with_a_note(build, tmp_path):
    from safetensors.torch import load_file, save_file

    built = build("qwen3_next")
    src = _copy(built, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors.update({k.replace("model.layers.2.", "mtp.layers.0."): v.clone()
                    for k, v in tensors.items() if k.startswith("model.layers.2.")})
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    summary = dern_stream.rewrite(src, tmp_path / "out", experts=4, importance="router-norm", progress=False)
    assert any("mtp.* tensors" in note for note in summary.notes)
    entries = Checkpoint(tmp_path / "out").entries
    assert not any(n.startswith("mtp.") for n in entries)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_fused_layer_with_an_unknown_expert_tensor_is_refused(build, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _copy(build("llama4_text"), tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.feed_forward.experts.down_proj_bias"] = torch.zeros(8, 64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = _rewrite(src, tmp_path)
    assert_clean_failure(result, tmp_path / "out",
                         "expert tensor this tool does not handle: model.layers.1.feed_forward.experts.down_proj_bias")


@pytest.mark.parametrize(("family", "changes"), [
    ("ernie4_5_moe", {"moe_layer_start_index": 0}),
    ("ernie4_5_moe", {"moe_layer_interval": 2}),
    ("glm4_moe", {"first_k_dense_replace": 0}),
    ("deepseek_v3", {"first_k_dense_replace": DELETE}),  # absent: DeepseekV3Config makes layers 0-2 dense
    ("qwen2_moe", {"decoder_sparse_step": 2}),
    ("llama4_text", {"moe_layers": [0, 1, 2, 3]}),
])
def test_moe_layers_the_config_does_not_place_are_one_line(family, changes, build, tmp_path):
    src = _copy(build(family), tmp_path, **changes)
    result = _rewrite(src, tmp_path)
    assert_clean_failure(result, tmp_path / "out", "MoE layers, but the shards hold routers in layers")


def test_glm4_moe_n_group_without_topk_group(build, tmp_path):
    src = _copy(build("glm4_moe"), tmp_path, topk_group=DELETE)  # Glm4MoeConfig's default topk_group: 1
    assert _rewrite(src, tmp_path, "--experts", "4").exit_code == 0


def test_each_record_names_the_class_transformers_builds_for_it():
    """A config of another model_type that names this class (Kimi-K2's kimi_k2) is handled as the family: the names
    must be transformers' own (DeepSeek-MoE-16B's: its published config.json's)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )

    from dern_stream.families import FAMILIES

    for model_type, family in FAMILIES.items():
        # (a multimodal model: its own class, not a causal LM's)
        classes = MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES if family.multimodal else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        expected = family.tiny_config["architectures"] if family.remote_code else [classes[model_type]]
        assert list(family.architectures) == expected, model_type


def test_an_unsupported_multimodal_moe_checkpoint_is_named_as_such():
    """Kimi-VL (remote code), or an omni model's thinker one level down: the expert count sits in a text_config; the
    refusal says so, and names the multimodal models supported, rather than calling the model dense."""
    import pytest

    from dern_stream.errors import DernError
    from dern_stream.families import family_for

    for config in ({"model_type": "kimi_vl", "text_config": {"model_type": "deepseek_v3", "n_routed_experts": 64}},
                   {"model_type": "acme_omni", "thinker_config": {"text_config": {
                       "model_type": "acme_omni_text", "num_experts": 128}}}):
        with pytest.raises(DernError, match=r"multimodal checkpoint whose text model is a Mixture-of-Experts model "
                                            r"\((deepseek_v3|acme_omni_text)\).*supported: gemma4, glm4v_moe, llama4"):
            family_for(config)


def test_a_text_model_transformers_cannot_load_alone_is_refused_with_its_reason():
    import pytest

    from dern_stream.errors import DernError
    from dern_stream.families import family_for

    config = {"model_type": "qwen3_vl_moe_text", "num_experts": 8, "hidden_size": 64}
    with pytest.raises(DernError, match=r"model_type 'qwen3_vl_moe_text' is not supported: transformers has no class "
                                        r"that loads this text model alone \(its multimodal model, qwen3_vl_moe"):
        family_for(config)
