"""Granite MoE and Granite 4 (`granitemoehybrid`: Mamba2 and attention layers, copied as they are): a layer's experts
fused into two tensors, `input_linear` [N, 2h, d] (gate rows, then up rows) and `output_linear` [N, d, h]; softmax
over the top-k logits (= softmax, top-k, renormalised). Granite 4's `shared_mlp` beside every MoE block, of its own
width `shared_intermediate_size`, is left as it is."""

from __future__ import annotations

from dataclasses import replace

from ..config_rules import NONNEG_FLOAT, POS_FLOAT, POS_INT, opt
from ..record import Family, FusedExperts, always
from ..routing import softmax_top_k

_FUSED = FusedExperts("block_sparse_moe.", "block_sparse_moe.input_linear.weight",
                      "block_sparse_moe.output_linear.weight", gate_up_cols=False, down_cols=False)
_MEMORY_NAMES = (("block_sparse_moe.router.", "block_sparse_moe.router.layer."),
                 ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
                 ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight"))

GRANITE_MOE = Family(
    model_type="granitemoe",
    architectures=("GraniteMoeForCausalLM",),
    expert_count_keys=("num_local_experts",),
    intermediate_key="intermediate_size",
    make_router=softmax_top_k,
    router="block_sparse_moe.router.layer.weight",
    fused=_FUSED,
    memory_names=_MEMORY_NAMES,
    renormalises=always,
    tiny_config=dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
)

FAMILIES = (
    GRANITE_MOE,
    # Granite 4: Granite MoE's experts and routing, its own config keys
    replace(
        GRANITE_MOE,
        model_type="granitemoehybrid",
        architectures=("GraniteMoeHybridForCausalLM",),
        config_rules={
            "num_key_value_heads": opt(POS_INT, nullable=True),  # null: as many as attention heads
            "shared_intermediate_size": opt(POS_INT),
            "embedding_multiplier": opt(NONNEG_FLOAT),
            "residual_multiplier": opt(NONNEG_FLOAT),
            "logits_scaling": opt(POS_FLOAT),
        },
        tiny_config=dict(intermediate_size=32, shared_intermediate_size=48, num_local_experts=8,
                         num_experts_per_tok=2, layer_types=["linear_attention", "full_attention", "linear_attention"],
                         mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16),
    ),
)
