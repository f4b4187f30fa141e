"""Qwen3-MoE: as Qwen2-MoE without a shared expert. transformers 5 writes `num_local_experts` where
Hub checkpoints say `num_experts`; whichever config.json holds is read and rewritten."""

from .base import Family
from .routing import softmax_top_k

FAMILY = Family(
    model_type="qwen3_moe",
    expert_count_keys=("num_experts", "num_local_experts"),
    intermediate_key="moe_intermediate_size",
    moe_module="mlp",
    proj_names=("gate_proj", "up_proj", "down_proj"),
    make_router=softmax_top_k,
)
