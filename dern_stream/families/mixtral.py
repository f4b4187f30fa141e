"""Mixtral: `block_sparse_moe`, experts w1 (gate) / w3 (up) / w2 (down); softmax top-k, always renormalised."""

from .base import Family
from .routing import softmax_top_k

FAMILY = Family(
    model_type="mixtral",
    expert_count_keys=("num_local_experts",),
    intermediate_key="intermediate_size",
    moe_module="block_sparse_moe",
    proj_names=("w1", "w3", "w2"),
    make_router=softmax_top_k,
    renormalises=lambda config: True,
)
