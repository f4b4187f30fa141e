"""Families with DeepSeek-V3's router in their own layouts: K-EXAONE (EXAONE-MoE) and MiniCPM-5-MoE. Sigmoid scores,
the choice on scores + correction bias within the best groups (group score = sum of its top two), renormalised
where norm_topk_prob says so, times routed_scaling_factor; dense MLP layers where `mlp_layer_types` says "dense"; one
shared expert block per MoE layer, untouched, whose width (count x moe_intermediate_size) is kept by rescaling the
count."""

from __future__ import annotations

from dataclasses import replace

from ..config_rules import BOOL, NONNEG_INT, POS_FLOAT, POS_INT, opt
from ..record import Family
from .deepseek import MLP_LAYER_TYPES, sparse_layer, v3_like

# The transformers class of each family here: config.json's `architectures` names it.
CAUSAL_LM_CLASSES = {"exaone_moe": "ExaoneMoeForCausalLM", "minicpm5_moe": "MiniCPM5MoeForCausalLM"}


def v3_router_family(model_type: str, expert_keys: tuple[str, ...], bias: str, shared_key: str, scale: float,
                     rules: dict, tiny: dict, memory_names: tuple[tuple[str, str], ...] = ()) -> Family:
    """DeepSeek-V3's record (deepseek.v3_like) with the family's own bias, shared-expert key and names; MoE layers as
    `mlp_layer_types` says, else after first_k_dense_replace (default 1); groups 1 and 1 where config.json leaves them
    out."""
    return replace(
        v3_like(model_type, scale, {
            "num_key_value_heads": opt(POS_INT, nullable=True),
            "head_dim": opt(POS_INT, nullable=True),
            "intermediate_size": opt(POS_INT),  # the dense layers' MLP
            shared_key: opt(NONNEG_INT),
            "first_k_dense_replace": opt(NONNEG_INT),
            "mlp_layer_types": opt(MLP_LAYER_TYPES, nullable=True),
            "routed_scaling_factor": opt(POS_FLOAT),
            "norm_topk_prob": opt(BOOL),
            "n_group": opt(POS_INT),  # absent: 1 (the config classes' default)
            "topk_group": opt(POS_INT),
            **rules,
        }, tiny, groups=(1, 1), moe_layer=sparse_layer, expert_keys=expert_keys,
            architecture=CAUSAL_LM_CLASSES[model_type]),
        bias=bias, memory_names=memory_names, shared_count_key=shared_key,
    )


_TINY = dict(moe_intermediate_size=32, intermediate_size=96, num_experts_per_tok=2, head_dim=16,
             first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = (
    # K-EXAONE: the correction bias is stored beside the router, `mlp.e_score_correction_bias` (transformers keeps it
    # under mlp.gate.); sliding-window attention layers are copied like any attention.
    v3_router_family(
        "exaone_moe", ("num_experts",), "mlp.e_score_correction_bias", "num_shared_experts", 2.5,
        {"sliding_window": opt(POS_INT, nullable=True)},
        dict(_TINY, num_experts=8, num_shared_experts=1, sliding_window=8),
        memory_names=(("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"),),
    ),
    # MiniCPM-5-MoE: gated attention whose query and gate rows transformers loads into `self_attn.q_gate_proj`
    # from the stored `self_attn.q_proj`.
    v3_router_family(
        "minicpm5_moe", ("n_routed_experts", "num_local_experts"), "mlp.gate.e_score_correction_bias",
        "n_shared_experts", 3.66, {},
        dict(_TINY, n_routed_experts=8, n_shared_experts=1),
        memory_names=(("self_attn.q_gate_proj.", "self_attn.q_proj."),),
    ),
)
