"""DeepSeek-V2 and -V3: routed experts beside untouched shared experts; the first
`first_k_dense_replace` layers are dense (found by their missing router, so `moe_layer_freq`
and the V3 multi-token-prediction layer need no special case)."""

from .base import Family, grouped_if
from .routing import SigmoidGroupLimited, SoftmaxGroupLimited, softmax_top_k

_EXPERT_KEYS = ("n_routed_experts", "num_local_experts")
_PROJ = ("gate_proj", "up_proj", "down_proj")


def _v2_router(c: dict):
    if c.get("topk_method", "greedy") == "group_limited_greedy":
        return SoftmaxGroupLimited(c["num_experts_per_tok"], c["n_group"], c["topk_group"])
    return softmax_top_k(c)


def _v3_router(c: dict):
    return SigmoidGroupLimited(c["num_experts_per_tok"], c.get("n_group") or 1, c.get("topk_group") or 1)


DEEPSEEK_V2 = Family(
    model_type="deepseek_v2",
    expert_count_keys=_EXPERT_KEYS,
    intermediate_key="moe_intermediate_size",
    moe_module="mlp",
    proj_names=_PROJ,
    make_router=_v2_router,
    shared_size_follows_moe_size=True,
    grouped_routing=lambda c: c.get("topk_method") == "group_limited_greedy" and grouped_if(c),
    uses_groups=lambda c: c.get("topk_method") == "group_limited_greedy",
    renormalises=lambda c: False,  # transformers' DeepSeek-V2 ignores norm_topk_prob
    routed_scale=lambda c: float(c.get("routed_scaling_factor") or 1.0),
)

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3",
    expert_count_keys=_EXPERT_KEYS,
    intermediate_key="moe_intermediate_size",
    moe_module="mlp",
    proj_names=_PROJ,
    make_router=_v3_router,
    has_score_correction_bias=True,
    shared_size_follows_moe_size=True,
    grouped_routing=grouped_if,
    uses_groups=lambda c: True,
    min_group_experts=2,
    routed_scale=lambda c: float(c.get("routed_scaling_factor") or 1.0),
)
