"""OLMoE: softmax top-k over `mlp.gate`; experts named as in Qwen-MoE."""

from .base import Family
from .routing import softmax_top_k

FAMILY = Family(
    model_type="olmoe",
    expert_count_keys=("num_experts",),
    intermediate_key="intermediate_size",
    moe_module="mlp",
    proj_names=("gate_proj", "up_proj", "down_proj"),
    make_router=softmax_top_k,
)
