"""Granite MoE: a layer's experts fused into two tensors, `input_linear` [N, 2h, d] (gate rows, then up rows) and
`output_linear` [N, d, h]; softmax over the top-k logits (= softmax, top-k, renormalised)."""

from __future__ import annotations

from ..record import Family, FusedExperts, always
from ..routing import softmax_top_k

FAMILIES = (
    Family(
        model_type="granitemoe",
        expert_count_keys=("num_local_experts",),
        intermediate_key="intermediate_size",
        make_router=softmax_top_k,
        router="block_sparse_moe.router.layer.weight",
        fused=FusedExperts("block_sparse_moe.", "block_sparse_moe.input_linear.weight",
                           "block_sparse_moe.output_linear.weight", gate_up_cols=False, down_cols=False),
        memory_names=(("block_sparse_moe.router.", "block_sparse_moe.router.layer."),
                      ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
                      ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")),
        renormalises=always,
        tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
)
