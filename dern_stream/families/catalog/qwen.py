"""Qwen-MoE: Qwen1.5/Qwen2-MoE, Qwen3-MoE, Qwen3-Next (hybrid linear attention, copied like any attention),
Qwen3.5-MoE (its text model alone, or the multimodal model whose language model it is) and Qwen3-VL-MoE. The shared
expert and its gate, and a multimodal model's vision tower, are left as they are."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from ..config_rules import BOOL, POS_INT, opt
from ..record import Family, FusedExperts, always, norm_topk_prob
from ..routing import softmax_top_k

# A multimodal model's language model (checkpoint/config_view.py reads its config): its tensors' names, and the
# vision tower of its tiny model (the same for Qwen3-VL-MoE and Qwen3.5-MoE).
_LANGUAGE_MODEL = "model.language_model.layers"
_TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)

_LINEAR_ATTENTION = dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16,
                         layer_types=["linear_attention", "full_attention", "linear_attention"])


def qwen_sparse(config: dict, i: int) -> bool:
    """Qwen-MoE's MoE layers: every `decoder_sparse_step`-th layer, except `mlp_only_layers`."""
    return i not in (config.get("mlp_only_layers") or []) and (i + 1) % (config.get("decoder_sparse_step") or 1) == 0


_QWEN3_5_MOE_TEXT = Family(  # the text model of Qwen3.5-MoE, as transformers builds it
    model_type="qwen3_5_moe_text",
    architectures=("Qwen3_5MoeForCausalLM",),
    expert_count_keys=("num_experts", "num_local_experts"),
    intermediate_key="moe_intermediate_size",
    make_router=softmax_top_k,
    renormalises=always,
    drops_mtp=True,
    config_rules={
        "num_key_value_heads": opt(POS_INT),
        "head_dim": opt(POS_INT),
        "shared_expert_intermediate_size": opt(POS_INT),
    },
    tiny_config=dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                     num_experts_per_tok=2, **_LINEAR_ATTENTION),
)


FAMILIES = (
    Family(
        model_type="qwen2_moe",
        architectures=("Qwen2MoeForCausalLM",),
        moe_layer=qwen_sparse,
        expert_count_keys=("num_experts",),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "shared_expert_intermediate_size": opt(POS_INT),
            "decoder_sparse_step": opt(POS_INT),
            "norm_topk_prob": opt(BOOL),
        },
        tiny_config=dict(moe_intermediate_size=32, intermediate_size=96, shared_expert_intermediate_size=48,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    ),
    # transformers 5 writes `num_local_experts` where Hub checkpoints say `num_experts`: either is read.
    Family(
        model_type="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        moe_layer=qwen_sparse,
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "decoder_sparse_step": opt(POS_INT),
            "norm_topk_prob": opt(BOOL),
        },
        tiny_config=dict(moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, head_dim=16),
    ),
    Family(
        model_type="qwen3_next",
        architectures=("Qwen3NextForCausalLM",),
        moe_layer=qwen_sparse,
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        renormalises=partial(norm_topk_prob, default=True),
        drops_mtp=True,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "shared_expert_intermediate_size": opt(POS_INT),
            "decoder_sparse_step": opt(POS_INT),
            "norm_topk_prob": opt(BOOL),
        },
        tiny_config=dict(moe_intermediate_size=32, intermediate_size=96, shared_expert_intermediate_size=32,
                         num_experts=8, num_experts_per_tok=2, **_LINEAR_ATTENTION),
    ),
    _QWEN3_5_MOE_TEXT,
    Family(  # Qwen3-VL-MoE: its experts fused, which transformers loads in either orientation
        model_type="qwen3_vl_moe",
        architectures=("Qwen3VLMoeForConditionalGeneration",),
        layers=_LANGUAGE_MODEL,
        multimodal=True,
        moe_layer=qwen_sparse,
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        renormalises=always,
        fused=FusedExperts("mlp.experts.", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", gate_up_cols=False,
                           down_cols=False, transposable=True),
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "decoder_sparse_step": opt(POS_INT),
        },
        tiny_config=dict(text_config=dict(moe_intermediate_size=32, intermediate_size=96, num_experts=8,
                                          num_experts_per_tok=2, head_dim=16), vision_config=_TINY_VISION),
    ),
)

# Qwen3.5-MoE as released, the multimodal model whose language model is the text model above
FAMILIES += (replace(
    _QWEN3_5_MOE_TEXT, model_type="qwen3_5_moe", architectures=("Qwen3_5MoeForConditionalGeneration",),
    layers=_LANGUAGE_MODEL, multimodal=True,
    tiny_config=dict(text_config=_QWEN3_5_MOE_TEXT.tiny_config, vision_config=_TINY_VISION)),)

# Qwen3-Omni-MoE: its thinker (the language model, with audio and vision towers) alone, or the whole model, whose
# talker (another MoE model, that speaks what the thinker writes) and code-to-wave decoder are copied untouched
_QWEN3_MOE = next(f for f in FAMILIES if f.model_type == "qwen3_moe")
_TINY_THINKER = dict(
    text_config=_QWEN3_MOE.tiny_config,
    vision_config=dict(_TINY_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
    audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                      output_dim=64, downsample_hidden_size=16, max_source_positions=100))
# (the talker: another MoE model, with a shared expert, that the rewrite copies as it is)
_TINY_TALKER = dict(
    text_config=dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                     num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, vocab_size=128),
    code_predictor_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, vocab_size=64, num_code_groups=4),
    thinker_hidden_size=64, accept_hidden_layer=1, num_code_groups=4, spatial_merge_size=2)
FAMILIES += (
    # (transformers builds the thinker's towers and language model under `model.`, and stores them without it)
    replace(_QWEN3_MOE, model_type="qwen3_omni_moe_thinker", multimodal=True,
            memory_layers="model.language_model.layers",
            model_memory_names=(("model.language_model.", "model."), ("model.visual.", "visual."),
                                ("model.audio_tower.", "audio_tower.")),
            architectures=("Qwen3OmniMoeThinkerForConditionalGeneration",), tiny_config=_TINY_THINKER),
    replace(_QWEN3_MOE, model_type="qwen3_omni_moe", multimodal=True, layers="thinker.model.layers",
            memory_layers="thinker.model.language_model.layers",
            model_memory_names=(("thinker.model.language_model.", "thinker.model."),
                                ("thinker.model.visual.", "thinker.visual."),
                                ("thinker.model.audio_tower.", "thinker.audio_tower.")),
            architectures=("Qwen3OmniMoeForConditionalGeneration",),
            tiny_config=dict(thinker_config=_TINY_THINKER, enable_audio_output=True, talker_config=_TINY_TALKER,
                             code2wav_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=2, decoder_dim=32,
                                                  codebook_size=64, num_quantizers=4, upsample_rates=[2, 2],
                                                  upsampling_ratios=[2, 2], sliding_window=8))),
)
