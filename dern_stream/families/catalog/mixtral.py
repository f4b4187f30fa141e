"""Mixtral and the families stored in its layout: `block_sparse_moe`, experts' projections named w1 (gate), w3 (up)
and w2 (down)."""

from __future__ import annotations

from ..config_rules import NONNEG_FLOAT, POS_INT, opt
from ..record import Family, always, never
from ..routing import SigmoidGroupLimited, SparseMixer, softmax_top_k

W123 = ("w1", "w3", "w2")  # gate, up, down
TO_BLOCK_SPARSE_MOE = (("mlp.", "block_sparse_moe."),)  # in memory, on disk


def sparsemixer(config: dict) -> SparseMixer:
    return SparseMixer(float(config.get("router_jitter_noise", 0.01)))


def sigmoid_top_k(config: dict) -> SigmoidGroupLimited:
    """MiniMax-M2: sigmoid scores, the choice on scores + correction bias, one group."""
    return SigmoidGroupLimited(config["num_experts_per_tok"], 1, 1)


MIXTRAL = Family(
    model_type="mixtral",
    architectures=("MixtralForCausalLM",),
    expert_count_keys=("num_local_experts",),
    intermediate_key="intermediate_size",
    make_router=softmax_top_k,
    router="block_sparse_moe.gate.weight",
    experts="block_sparse_moe.experts.{e}.{proj}.weight",
    proj_names=W123,
    memory_names=TO_BLOCK_SPARSE_MOE,
    renormalises=always,
    config_rules={
        "num_key_value_heads": opt(POS_INT),
        "head_dim": opt(POS_INT, nullable=True),  # null: hidden_size / num_attention_heads
    },
    tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
)

FAMILIES = (
    MIXTRAL,
    Family(
        model_type="phimoe",
        architectures=("PhimoeForCausalLM",),
        expert_count_keys=("num_local_experts",),
        intermediate_key="intermediate_size",
        make_router=sparsemixer,
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names=W123,
        memory_names=(("mlp.router.", "block_sparse_moe.gate."), *TO_BLOCK_SPARSE_MOE),
        renormalises=never,  # the sparsemixer's multipliers are used as they are
        fixed_top_k=2,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "router_jitter_noise": opt(NONNEG_FLOAT),
        },
        tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
    Family(
        model_type="minimax_m2",
        architectures=("MiniMaxM2ForCausalLM",),
        expert_count_keys=("num_local_experts", "num_experts"),
        intermediate_key="intermediate_size",
        make_router=sigmoid_top_k,
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names=W123,
        bias="block_sparse_moe.e_score_correction_bias",
        memory_names=TO_BLOCK_SPARSE_MOE,
        renormalises=always,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT, nullable=True),
        },
        tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                         bos_token_id=1, eos_token_id=2),
    ),
)
