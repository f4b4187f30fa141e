"""Llama-4, its text model alone or the multimodal model as released: experts fused into `gate_up_proj` [N, d, 2h]
and `down_proj` [N, h, d]; the router's score, sigmoid of the top-k logits, scales the expert's input; a shared
expert in each MoE layer, untouched; MoE layers every `interleave_moe_layer_step` (found by their router)."""

from __future__ import annotations

from dataclasses import replace

from ..record import Family, FusedExperts, never
from ..routing import SigmoidTopK


def llama4_router(config: dict) -> SigmoidTopK:
    return SigmoidTopK(config["num_experts_per_tok"])


def llama4_moe_layer(config: dict, i: int) -> bool:
    if config.get("moe_layers") is not None:
        return i in config["moe_layers"]
    step = config.get("interleave_moe_layer_step") or 1
    return i % step == step - 1


LLAMA4_TEXT = Family(
    model_type="llama4_text",
    architectures=("Llama4ForCausalLM",),
    moe_layer=llama4_moe_layer,
    expert_count_keys=("num_local_experts",),
    intermediate_key="intermediate_size",
    make_router=llama4_router,
    router="feed_forward.router.weight",
    fused=FusedExperts("feed_forward.experts.", "feed_forward.experts.gate_up_proj",
                       "feed_forward.experts.down_proj", gate_up_cols=True, down_cols=True),
    renormalises=never,
    scales_expert_input=True,
    fixed_width="its shared expert reads the same intermediate_size as the routed experts",
    tiny_config=dict(intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1,
                     head_dim=16, interleave_moe_layer_step=2, num_hidden_layers=4, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0),
)

# Llama 4 as released (Scout, Maverick): the multimodal model whose language model is the text model above, its
# decoder layers under language_model.model (checkpoint/config_view.py reads its config)
FAMILIES = (LLAMA4_TEXT, replace(
    LLAMA4_TEXT, model_type="llama4", architectures=("Llama4ForConditionalGeneration",),
    layers="language_model.model.layers", multimodal=True,
    tiny_config=dict(text_config=LLAMA4_TEXT.tiny_config, vision_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14,
        vision_output_dim=64, projector_input_dim=64, projector_output_dim=64))))
