"""Softmax top-k families in the common layout (`mlp.gate.weight`, `mlp.experts.{e}.{gate,up,down}_proj`):
FlexOlmo (OLMo-2's post-norm layers; softmax top-k, renormalised where norm_topk_prob says so) and Cohere2-MoE
(parallel attention and MoE on the same normalised input; the top-k logits, their softmax or sigmoid; shared
experts, untouched, summed or averaged with the routed output)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from ..config_rules import BOOL, NONNEG_INT, POS_FLOAT, POS_INT, STR, opt
from ..record import Family, norm_topk_prob
from ..routing import SigmoidTopK, SoftmaxOverTopLogits
from .deepseek import MLP_LAYER_TYPES, sparse_layer
from .olmoe import OLMOE


def cohere2_router(config: dict) -> SoftmaxOverTopLogits | SigmoidTopK:
    """Cohere2-MoE: A = top-k of the logits; scores their softmax, or (expert_selection_fn "sigmoid") sigmoid."""
    if config.get("expert_selection_fn", "softmax") == "sigmoid":
        return SigmoidTopK(config["num_experts_per_tok"])
    return SoftmaxOverTopLogits(config["num_experts_per_tok"])


def cohere2_renormalises(config: dict) -> bool:
    """A softmax over the top-k logits sums to 1 already; sigmoid scores are renormalised where norm_topk_prob says."""
    return config.get("expert_selection_fn", "softmax") != "sigmoid" or norm_topk_prob(config, default=True)


def cohere2_scale(config: dict) -> float:
    """With shared experts combined by "average", the block returns (routed + shared) / 2."""
    shared = config.get("num_shared_experts") or 0
    return 0.5 if shared > 0 and config.get("shared_expert_combination_strategy", "average") == "average" else 1.0


FAMILIES = (
    # FlexOlmo: OLMoE's record under its own class, its expert count also as num_local_experts
    replace(OLMOE, model_type="flex_olmo", architectures=("FlexOlmoForCausalLM",),
            expert_count_keys=("num_experts", "num_local_experts")),
    Family(
        model_type="cohere2_moe",
        architectures=("Cohere2MoeForCausalLM",),
        moe_layer=partial(sparse_layer, dense=0),
        expert_count_keys=("num_experts",),
        intermediate_key="intermediate_size",
        make_router=cohere2_router,
        renormalises=cohere2_renormalises,
        routed_scale=cohere2_scale,
        fixed_width=("its shared experts (num_shared_experts x intermediate_size) and, where "
                     "prefix_dense_intermediate_size is null, its dense layers read the same intermediate_size"),
        config_rules={
            "num_key_value_heads": opt(POS_INT, nullable=True),
            "head_dim": opt(POS_INT),
            "rms_norm_eps": opt(POS_FLOAT, nullable=True),  # null: LayerNorm with layer_norm_eps
            "layer_norm_eps": opt(POS_FLOAT),
            "num_shared_experts": opt(NONNEG_INT),
            "shared_expert_combination_strategy": opt(STR, choices=("sum", "average")),
            "expert_selection_fn": opt(STR, choices=("softmax", "sigmoid")),
            "norm_topk_prob": opt(BOOL),
            "mlp_layer_types": opt(MLP_LAYER_TYPES, nullable=True),
            "prefix_dense_intermediate_size": opt(POS_INT, nullable=True),
            "sliding_window": opt(POS_INT, nullable=True),
        },
        # "sum" so that the tests can take the shared experts' part off the block's output
        tiny_config=dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16, num_shared_experts=1,
                         shared_expert_combination_strategy="sum", first_k_dense_replace=1,
                         prefix_dense_intermediate_size=96, sliding_window=8, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
    ),
)
