"""Hunyuan-A13B: softmax top-`moe_topk`, renormalised; the router under `mlp.gate.wg`; `shared_mlp` untouched."""

from __future__ import annotations

from ..config_rules import NONNEG_INT, POS_INT, opt
from ..record import Family, always
from ..routing import SoftmaxTopK


def hunyuan_router(config: dict) -> SoftmaxTopK:
    return SoftmaxTopK(config.get("moe_topk", config.get("num_experts_per_tok")))


FAMILIES = (
    Family(
        model_type="hunyuan_v1_moe",
        architectures=("HunYuanMoEV1ForCausalLM",),
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="intermediate_size",
        make_router=hunyuan_router,
        router="mlp.gate.wg.weight",
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        renormalises=always,
        fixed_width="its shared MLP and every dense MLP read the same intermediate_size",
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT, nullable=True),
            "num_shared_expert": opt(NONNEG_INT),
        },
        tiny_config=dict(intermediate_size=32, num_experts=8, moe_topk=2, head_dim=16),
    ),
)
