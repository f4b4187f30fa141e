"""OLMoE: softmax top-k, the scores renormalised where norm_topk_prob says so."""

from __future__ import annotations

from ..config_rules import BOOL, POS_INT, opt
from ..record import Family
from ..routing import softmax_top_k

OLMOE = Family(
    model_type="olmoe",
    architectures=("OlmoeForCausalLM",),
    expert_count_keys=("num_experts",),
    intermediate_key="intermediate_size",
    make_router=softmax_top_k,
    config_rules={
        "num_key_value_heads": opt(POS_INT, nullable=True),
        "norm_topk_prob": opt(BOOL),
    },
    tiny_config=dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1),
)

FAMILIES = (OLMOE,)
