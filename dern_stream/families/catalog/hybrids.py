"""Hybrid MoE families whose other sequence mixers are copied as they are: MiniMax-Text-01 (lightning / linear
attention layers beside full attention, every layer an MoE layer in Mixtral's on-disk layout) and Jamba (Mamba and
attention layers, an MoE block under `feed_forward` every `expert_layer_period`-th layer)."""

from __future__ import annotations

from dataclasses import replace

from ..config_rules import NONNEG_INT, POS_INT, opt
from ..record import Family, never
from ..routing import softmax_top_k
from .mixtral import MIXTRAL


def jamba_moe_layer(config: dict, i: int) -> bool:
    """Jamba's MoE layers: i % expert_layer_period == expert_layer_offset (JambaConfig.layers_num_experts)."""
    period, offset = config.get("expert_layer_period", 2), config.get("expert_layer_offset", 1)
    return i % (2 if period is None else period) == (1 if offset is None else offset)


FAMILIES = (
    # MiniMax-Text-01: softmax top-k, renormalised; mlp_alpha_factor / mlp_beta_factor scale the residual and the
    # whole block's output, not the choice among experts.
    replace(
        MIXTRAL,
        model_type="minimax",
        architectures=("MiniMaxForCausalLM",),
        expert_count_keys=("num_local_experts", "num_experts"),
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT, nullable=True),  # null: hidden_size / num_attention_heads
            "block_size": opt(POS_INT),
        },
        tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, block_size=16,
                         layer_types=["linear_attention", "full_attention", "linear_attention"]),
    ),
    # Jamba: softmax top-k, the scores used as they are. JambaConfig gives a layer its MoE block only where
    # num_experts > 1 (else a dense MLP of the same names' parent), so one kept expert cannot be loaded back.
    Family(
        model_type="jamba",
        architectures=("JambaForCausalLM",),
        moe_layer=jamba_moe_layer,
        expert_count_keys=("num_experts",),
        intermediate_key="intermediate_size",
        make_router=softmax_top_k,
        router="feed_forward.router.weight",
        experts="feed_forward.experts.{e}.{proj}.weight",
        renormalises=never,
        min_experts=(2, "JambaConfig builds a layer of one expert as a dense MLP"),
        fixed_width="its dense MLP layers read the same intermediate_size as the routed experts",
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "expert_layer_period": opt(POS_INT),
            "expert_layer_offset": opt(NONNEG_INT),
            "attn_layer_period": opt(POS_INT),
            "attn_layer_offset": opt(NONNEG_INT),
        },
        # layer 1 attention, layers 0, 2, 3 Mamba; layers 1 and 3 MoE
        tiny_config=dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
                         attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                         mamba_d_state=8, mamba_expand=1),
    ),
)
