"""Families beside attention-only lineages whose MoE block routes by sigmoid scores with the choice on scores + an
expert bias, renormalised and scaled (the MiniMax-M2 rule in their own layouts):

- LFM2-MoE (`lfm2_moe`): short-convolution and attention layers, copied as they are; the first `num_dense_layers`
  layers dense (`feed_forward.w1/w3/w2`), then MoE blocks under `feed_forward`, experts' projections w1 (gate),
  w3 (up), w2 (down), the bias `feed_forward.expert_bias` (present where `use_expert_bias`).
- AFMoE (`afmoe`, Arcee): the router under `mlp.router.gate`, the bias `mlp.expert_bias`, scaled by `route_scale`;
  shared experts of width `num_shared_experts` x the routed width, untouched.

Granite 4 (Mamba2 + attention, `granitemoehybrid`) is in granite.py; Gemma 4's text model in gemma.py."""

from __future__ import annotations

from functools import partial

from ..config_rules import BOOL, NONNEG_INT, POS_FLOAT, POS_INT, opt
from ..record import Family, always, norm_topk_prob
from .deepseek import routed_scaling_factor
from .mixtral import W123, sigmoid_top_k


def after_dense_layers(config: dict, i: int, default: int = 0) -> bool:
    """The first `num_dense_layers` layers are dense (absent: the config class's default)."""
    dense = config.get("num_dense_layers", default)
    return i >= (default if dense is None else dense)


def route_scale(config: dict) -> float:
    """AFMoE: the renormalised scores times `route_scale` (default 1)."""
    value = config.get("route_scale", 1.0)
    return float(1.0 if value is None else value)


FAMILIES = (
    Family(
        model_type="lfm2_moe",
        architectures=("Lfm2MoeForCausalLM",),
        moe_layer=partial(after_dense_layers, default=2),
        expert_count_keys=("num_experts",),
        intermediate_key="moe_intermediate_size",
        make_router=sigmoid_top_k,
        router="feed_forward.gate.weight",
        experts="feed_forward.experts.{e}.{proj}.weight",
        proj_names=W123,
        bias="feed_forward.expert_bias",
        renormalises=partial(norm_topk_prob, default=True),
        routed_scale=routed_scaling_factor,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "intermediate_size": opt(POS_INT),  # the dense layers' MLP
            "num_dense_layers": opt(NONNEG_INT),
            "norm_topk_prob": opt(BOOL),
            "use_expert_bias": opt(BOOL),
            "routed_scaling_factor": opt(POS_FLOAT),
            "conv_L_cache": opt(POS_INT),
        },
        tiny_config=dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    ),
    Family(
        model_type="afmoe",
        architectures=("AfmoeForCausalLM",),
        moe_layer=partial(after_dense_layers, default=1),
        expert_count_keys=("num_experts",),
        intermediate_key="moe_intermediate_size",
        make_router=sigmoid_top_k,
        router="mlp.router.gate.weight",
        bias="mlp.expert_bias",
        shared_count_key="num_shared_experts",
        renormalises=always,
        routed_scale=route_scale,
        config_rules={
            "num_key_value_heads": opt(POS_INT, nullable=True),  # null: as many as attention heads
            "head_dim": opt(POS_INT),
            "intermediate_size": opt(POS_INT),  # the dense layers' MLP
            "num_dense_layers": opt(NONNEG_INT),
            "num_shared_experts": opt(NONNEG_INT),
            "route_scale": opt(POS_FLOAT),
            "global_attn_every_n_layers": opt(POS_INT),
            "sliding_window": opt(POS_INT),
        },
        tiny_config=dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         num_shared_experts=1, num_dense_layers=1, head_dim=16, global_attn_every_n_layers=2,
                         sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    ),
)
