"""Gemma 4's text model (`gemma4_text`, Gemma4ForCausalLM, with `enable_moe_block`), alone or as the language model
of the multimodal `gemma4` as released: every decoder layer runs a dense
MLP (`mlp.*`, of width `intermediate_size`, untouched) and beside it routed experts that sit on the layer itself, not
in an MoE block:

- the router (`router.*`) reads the layer's residual stream x after attention, normalised with no weight of its own,
  times `router.scale` [d] and d^-0.5: logits = proj(rmsnorm(x) * scale * d^-0.5); softmax over N, top
  `top_k_experts`, renormalised over those k, then each weight times `router.per_expert_scale[e]`;
- the experts, fused as Granite's (`experts.gate_up_proj` [N, 2h, d], gate rows then up rows; `experts.down_proj`
  [N, d, h]), read pre_feedforward_layernorm_2(x) = rmsnorm(x) * w (Gemma 4's RMSNorm multiplies by its weight),
  with gelu_pytorch_tanh; their sum then goes through post_feedforward_layernorm_2, untouched.

The calibration dump holds the experts' input; the router's is recovered from it exactly (record.RouterInput).
per_expert_scale is per-expert data carried with the fused experts (record.FusedExperts.scale)."""

from __future__ import annotations

from dataclasses import replace

from ..config_rules import BOOL, POS_INT, STR, exactly, opt, req
from ..record import Family, FusedExperts, RouterInput, always
from ..routing import SoftmaxTopK


def gemma4_router(config: dict) -> SoftmaxTopK:
    return SoftmaxTopK(config["top_k_experts"])


# Without the MoE block a Gemma 4 text model is dense: refused by config_check.py with this line.
MOE_BLOCK = exactly(True, "true (without it a Gemma 4 text model is dense, not a Mixture-of-Experts model)")
# The small dense Gemma 4 models' per-layer inputs and K/V shared across layers, which the streamed forward of dump
# and eval cannot run a layer at a time (the released MoE model, 26B-A4B, has neither).
NO_PER_LAYER_INPUT = exactly(0, "0 (per-layer input embeddings are not supported)")
NO_KV_SHARING = exactly(0, "0 (K/V shared across layers is not supported)")

GEMMA4_TEXT = Family(
    model_type="gemma4_text",
    architectures=("Gemma4ForCausalLM",),
    expert_count_keys=("num_experts",),
    top_k_keys=("top_k_experts",),
    intermediate_key="moe_intermediate_size",  # (the dense MLP's intermediate_size is another key: untouched)
    make_router=gemma4_router,
    router="router.proj.weight",
    fused=FusedExperts("experts.", "experts.gate_up_proj", "experts.down_proj", gate_up_cols=False,
                       down_cols=False, scale="router.per_expert_scale"),
    router_input=RouterInput(scale="router.scale", norm="pre_feedforward_layernorm_2.weight"),
    renormalises=always,
    config_rules={
        "enable_moe_block": req(MOE_BLOCK),
        "num_key_value_heads": opt(POS_INT),
        "head_dim": opt(POS_INT),
        "intermediate_size": opt(POS_INT),
        "hidden_activation": opt(STR),
        "hidden_size_per_layer_input": req(NO_PER_LAYER_INPUT),  # (the config class's default is 256)
        "num_kv_shared_layers": opt(NO_KV_SHARING),
        "num_global_key_value_heads": opt(POS_INT, nullable=True),
        "global_head_dim": opt(POS_INT),
        "attention_k_eq_v": opt(BOOL),
        "use_double_wide_mlp": opt(BOOL),
    },
    tiny_config=dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, top_k_experts=2,
                     enable_moe_block=True, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=0),
)

# Gemma 4 as released: the multimodal model whose language model is the text model above (config_view.py)
FAMILIES = (GEMMA4_TEXT, replace(
    GEMMA4_TEXT, model_type="gemma4", architectures=("Gemma4ForConditionalGeneration",),
    layers="model.language_model.layers", multimodal=True,
    tiny_config=dict(text_config=GEMMA4_TEXT.tiny_config, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, position_embedding_size=64), audio_config=None)))
