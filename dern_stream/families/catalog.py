"""Every supported family, as data.

Adding a family is one entry here and one config table in config_check.py:
1. Build a tiny model with the family's transformers config class, `save_pretrained` it and list the keys:
   the router, the experts (`{e}` and `{proj}` in the template), a score-correction bias if any.
2. Read the family's router in transformers' modeling file and pick (or add, in routing.py) the rule that
   reproduces its choice of experts and their scores; say whether the scores are renormalised and scaled.
3. Where transformers keeps the MoE block under another in-memory name than the file's (Mixtral's
   `block_sparse_moe` is `mlp` in memory), list the prefixes in `memory_names`.
4. Add the tiny config to tiny_models.FAMILY_CONFIGS: the family-wide tests then cover it.
Everything not named here (attention, norms, shared experts and their gates, dense layers) is copied as is.
"""

from __future__ import annotations

from .activations import ClampedSwiGLU
from .record import Family, FusedExperts, grouped_if
from .routing import (
    SigmoidGroupLimited,
    SigmoidTopK,
    SoftmaxBiasedChoice,
    SoftmaxGroupLimited,
    SoftmaxOverTopLogits,
    SparseMixer,
    softmax_top_k,
)

_DEEPSEEK_EXPERT_KEYS = ("n_routed_experts", "num_local_experts")
_W123 = ("w1", "w3", "w2")  # Mixtral's names: gate, up, down
_TO_BLOCK_SPARSE_MOE = (("mlp.", "block_sparse_moe."),)


def _deepseek_v2_router(c: dict):
    if c.get("topk_method", "greedy") == "group_limited_greedy":
        return SoftmaxGroupLimited(c["num_experts_per_tok"], c["n_group"], c["topk_group"])
    return softmax_top_k(c)


def _sigmoid_grouped_router(c: dict):
    """DeepSeek-V3 `noaux_tc`: sigmoid scores, the choice on scores + bias within the best groups."""
    return SigmoidGroupLimited(c["num_experts_per_tok"], c.get("n_group") or 1, c.get("topk_group") or 1)


def _routed_scale(c: dict, default: float = 1.0) -> float:
    value = c.get("routed_scaling_factor", default)
    return float(default if value is None else value)


def _norm_topk(default: bool):
    """Whether the scores are renormalised over A(x): config.json's norm_topk_prob, else the config class's default."""
    return lambda c: bool(c.get("norm_topk_prob", default))


def _after_dense(default: int):
    """DeepSeek, GLM: the first `first_k_dense_replace` layers are dense (absent: the config class's default)."""
    return lambda c, i: i >= (c.get("first_k_dense_replace", default) or 0)


def _qwen_sparse(c: dict, i: int) -> bool:
    """Qwen-MoE: every `decoder_sparse_step`-th layer, except `mlp_only_layers`."""
    return i not in (c.get("mlp_only_layers") or []) and (i + 1) % (c.get("decoder_sparse_step") or 1) == 0


def _ernie_moe_layer(c: dict, i: int) -> bool:
    end = c.get("moe_layer_end_index", -1)
    end = c["num_hidden_layers"] - 1 if end in (-1, None) else end
    start = c.get("moe_layer_start_index", 1)
    return (i + 1) % (c.get("moe_layer_interval") or 1) == 0 and (1 if start is None else start) <= i <= end


def _llama4_moe_layer(c: dict, i: int) -> bool:
    if c.get("moe_layers") is not None:
        return i in c["moe_layers"]
    step = c.get("interleave_moe_layer_step") or 1
    return i % step == step - 1


def _deepseek_v3_like(model_type: str, scale: float, groups: tuple[int, int] | None = None,
                      dense: int = 3) -> Family:
    """DeepSeek-V3 and the families built on its MoE block (V3.2, GLM-4.5/4.6). `scale`: the config class's
    default routed_scaling_factor; `groups`: its default n_group, topk_group where it may leave them out."""
    return Family(
        model_type=model_type,
        expert_count_keys=_DEEPSEEK_EXPERT_KEYS,
        intermediate_key="moe_intermediate_size",
        make_router=_sigmoid_grouped_router,
        bias="mlp.gate.e_score_correction_bias",
        shared_count_key="n_shared_experts",
        grouped_routing=grouped_if,
        uses_groups=lambda c: True,
        group_defaults=groups,
        moe_layer=_after_dense(dense),
        min_group_experts=2,
        renormalises=_norm_topk(True),
        routed_scale=lambda c: _routed_scale(c, scale),
    )


ALL: tuple[Family, ...] = (
    Family(
        model_type="mixtral",
        expert_count_keys=("num_local_experts",),
        intermediate_key="intermediate_size",
        make_router=softmax_top_k,
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names=_W123,
        memory_names=_TO_BLOCK_SPARSE_MOE,
        renormalises=lambda c: True,
    ),
    Family(
        model_type="phimoe",
        expert_count_keys=("num_local_experts",),
        intermediate_key="intermediate_size",
        make_router=lambda c: SparseMixer(float(c.get("router_jitter_noise", 0.01))),
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names=_W123,
        memory_names=(("mlp.router.", "block_sparse_moe.gate."), *_TO_BLOCK_SPARSE_MOE),
        renormalises=lambda c: False,  # the sparsemixer's multipliers are used as they are
        fixed_top_k=2,
    ),
    Family(
        model_type="minimax_m2",
        expert_count_keys=("num_local_experts", "num_experts"),
        intermediate_key="intermediate_size",
        make_router=lambda c: SigmoidGroupLimited(c["num_experts_per_tok"], 1, 1),
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names=_W123,
        bias="block_sparse_moe.e_score_correction_bias",
        memory_names=_TO_BLOCK_SPARSE_MOE,
        renormalises=lambda c: True,
    ),
    Family(
        model_type="qwen2_moe",
        moe_layer=_qwen_sparse,
        expert_count_keys=("num_experts",),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
    ),
    # transformers 5 writes `num_local_experts` where Hub checkpoints say `num_experts`: either is read.
    Family(
        model_type="qwen3_moe",
        moe_layer=_qwen_sparse,
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
    ),
    Family(  # hybrid: linear-attention layers are copied like any attention
        model_type="qwen3_next",
        moe_layer=_qwen_sparse,
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        renormalises=_norm_topk(True),
        drops_mtp=True,
    ),
    Family(  # the text model of Qwen3.5-MoE, as transformers builds it
        model_type="qwen3_5_moe_text",
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        renormalises=lambda c: True,
        drops_mtp=True,
    ),
    Family(
        model_type="olmoe",
        expert_count_keys=("num_experts",),
        intermediate_key="intermediate_size",
        make_router=softmax_top_k,
    ),
    Family(
        model_type="hunyuan_v1_moe",
        expert_count_keys=("num_experts", "num_local_experts"),
        intermediate_key="intermediate_size",
        make_router=lambda c: softmax_top_k({"num_experts_per_tok": c.get("moe_topk", c.get("num_experts_per_tok"))}),
        router="mlp.gate.wg.weight",
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        renormalises=lambda c: True,
        fixed_width="its shared MLP and every dense MLP read the same intermediate_size",
    ),
    Family(
        model_type="ernie4_5_moe",
        moe_layer=_ernie_moe_layer,
        expert_count_keys=("moe_num_experts", "num_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=lambda c: SoftmaxBiasedChoice(c.get("moe_k", c.get("num_experts_per_tok"))),
        bias="mlp.moe_statics.e_score_correction_bias",
        top_k_keys=("moe_k", "num_experts_per_tok"),
        memory_names=(("mlp.gate.moe_statics.", "mlp.moe_statics."),),
        shared_count_key="moe_num_shared_experts",
        renormalises=lambda c: True,
        drops_mtp=True,
    ),
    Family(
        model_type="deepseek_v2",
        moe_layer=_after_dense(0),
        expert_count_keys=_DEEPSEEK_EXPERT_KEYS,
        intermediate_key="moe_intermediate_size",
        make_router=_deepseek_v2_router,
        shared_count_key="n_shared_experts",
        grouped_routing=lambda c: c.get("topk_method") == "group_limited_greedy" and grouped_if(c),
        uses_groups=lambda c: c.get("topk_method") == "group_limited_greedy",
        renormalises=lambda c: False,  # transformers' DeepSeek-V2 ignores norm_topk_prob
        routed_scale=lambda c: _routed_scale(c),
    ),
    _deepseek_v3_like("deepseek_v3", 2.5),
    _deepseek_v3_like("deepseek_v32", 2.5),
    _deepseek_v3_like("glm4_moe", 1.0, groups=(1, 1), dense=1),
    # Experts fused into two tensors per layer (expert e = slice e of the leading dimension).
    Family(
        model_type="granitemoe",
        expert_count_keys=("num_local_experts",),
        intermediate_key="intermediate_size",
        make_router=softmax_top_k,  # softmax over the top-k logits: softmax, top-k, renormalised
        router="block_sparse_moe.router.layer.weight",
        fused=FusedExperts("block_sparse_moe.", "block_sparse_moe.input_linear.weight",
                           "block_sparse_moe.output_linear.weight", gate_up_cols=False, down_cols=False),
        memory_names=(("block_sparse_moe.router.", "block_sparse_moe.router.layer."),
                      ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.input_linear.weight"),
                      ("block_sparse_moe.experts.down_proj", "block_sparse_moe.output_linear.weight")),
        renormalises=lambda c: True,
    ),
    Family(  # MoE layers every interleave_moe_layer_step (found by their router); a shared expert in each
        model_type="llama4_text",
        moe_layer=_llama4_moe_layer,
        expert_count_keys=("num_local_experts",),
        intermediate_key="intermediate_size",
        make_router=lambda c: SigmoidTopK(c["num_experts_per_tok"]),
        router="feed_forward.router.weight",
        fused=FusedExperts("feed_forward.experts.", "feed_forward.experts.gate_up_proj",
                           "feed_forward.experts.down_proj", gate_up_cols=True, down_cols=True),
        renormalises=lambda c: False,
        scales_expert_input=True,
        fixed_width="its shared expert reads the same intermediate_size as the routed experts",
    ),
    Family(  # expert biases are part of each neuron's segment; the router's bias is part of its logits
        model_type="gpt_oss",
        expert_count_keys=("num_local_experts", "num_experts"),
        intermediate_key="intermediate_size",
        make_router=lambda c: SoftmaxOverTopLogits(c["num_experts_per_tok"]),
        router="mlp.router.weight",
        bias="mlp.router.bias",
        bias_in_logits=True,
        fused=FusedExperts("mlp.experts.", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", gate_up_cols=True,
                           down_cols=True, interleaved=True, gate_up_bias="mlp.experts.gate_up_proj_bias",
                           down_bias="mlp.experts.down_proj_bias"),
        make_glu=lambda c: ClampedSwiGLU(float(c.get("swiglu_alpha", 1.702)), float(c.get("swiglu_limit", 7.0))),
        renormalises=lambda c: False,  # the softmax over the top-k logits sums to 1 already
    ),
    # DeepSeek-MoE-16B (the DERN paper's third model): remote code only, so its on-disk layout is all there
    # is to go by (published config.json and modeling_deepseek.py): softmax top-k, weights as they are.
    Family(
        model_type="deepseek",
        moe_layer=lambda c, i: i >= (c.get("first_k_dense_replace") or 0) and i % (c.get("moe_layer_freq") or 1) == 0,
        expert_count_keys=("n_routed_experts",),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        shared_count_key="n_shared_experts",
        remote_code=True,
    ),
)
