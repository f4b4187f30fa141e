"""LongCat-Flash: each decoder layer holds two attention sublayers and two dense MLPs, and one MoE block whose
output joins the layer's at its end (a shortcut). Its router scores N routed experts and Z zero-computation experts
(`zero_expert_num`, each returning its input) with one [N + Z, d] classifier and an [N + Z] correction bias:
softmax over all N + Z, the choice on softmax + bias, the weights the softmax values times routed_scaling_factor.
The zero experts are not weights: every rewrite keeps their rows after the K kept experts' (record.passive_key)."""

from __future__ import annotations

from ..config_rules import NONNEG_INT, POS_FLOAT, POS_INT, STR, exactly, opt
from ..record import Family, never
from ..routing import SoftmaxBiasedChoice
from .deepseek import routed_scaling_factor


def longcat_router(config: dict) -> SoftmaxBiasedChoice:
    return SoftmaxBiasedChoice(config.get("moe_topk", config.get("num_experts_per_tok")))


def longcat_scale(config: dict) -> float:
    return routed_scaling_factor(config, default=6.0)


FALSE = exactly(False, "false (dern-stream does not support a router with a logits bias)")

FAMILIES = (
    Family(
        model_type="longcat_flash",
        architectures=("LongcatFlashForCausalLM",),
        expert_count_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        intermediate_key="expert_ffn_hidden_size",
        layers_key="num_layers",
        hidden_layers_per_layer=2,  # (each holds two attention sublayers: LongcatFlashConfig.num_hidden_layers)
        passive_key="zero_expert_num",
        passive_default=256,  # LongcatFlashConfig's
        make_router=longcat_router,
        router="mlp.router.classifier.weight",
        bias="mlp.router.e_score_correction_bias",
        renormalises=never,
        routed_scale=longcat_scale,
        config_rules={
            "num_key_value_heads": opt(POS_INT, nullable=True),
            "ffn_hidden_size": opt(POS_INT),
            "zero_expert_num": opt(NONNEG_INT),  # (null builds no model in transformers 5.25)
            "zero_expert_type": opt(STR, choices=("identity",)),
            # a logits bias [N + Z] beside the classifier, which transformers builds but no release has
            "router_bias": opt(FALSE),
            "routed_scaling_factor": opt(POS_FLOAT),
            "q_lora_rank": opt(POS_INT),
            "kv_lora_rank": opt(POS_INT),
            "qk_nope_head_dim": opt(POS_INT),
            "qk_rope_head_dim": opt(POS_INT),
            "v_head_dim": opt(POS_INT),
        },
        tiny_config=dict(n_routed_experts=8, zero_expert_num=2, moe_topk=3, expert_ffn_hidden_size=32,
                         ffn_hidden_size=96, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                         v_head_dim=16, head_dim=8, routed_scaling_factor=2.0),
    ),
)
