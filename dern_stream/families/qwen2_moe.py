"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax top-k; the shared expert and its gate are untouched."""

from .base import Family
from .routing import softmax_top_k

FAMILY = Family(
    model_type="qwen2_moe",
    expert_count_keys=("num_experts",),
    intermediate_key="moe_intermediate_size",
    moe_module="mlp",
    proj_names=("gate_proj", "up_proj", "down_proj"),
    make_router=softmax_top_k,
)
