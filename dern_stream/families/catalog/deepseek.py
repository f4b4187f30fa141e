"""DeepSeek's MoE block and the families built on it: DeepSeek-MoE-16B (remote code), DeepSeek-V2 (softmax, greedy
or group-limited), DeepSeek-V3/V3.2, GLM-4.5/4.6, GLM-4.7-Flash and dots.llm1 (sigmoid scores, the choice on
scores + correction bias within the best groups), GLM-5 and Kimi-Linear (at the end). Shared experts keep their
width by rescaling `n_shared_experts` (Kimi-Linear: `num_shared_experts`). LongCat-Flash, MLA too, with zero
experts: longcat.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

from ..config_rules import BOOL, NONNEG_INT, POS_FLOAT, POS_INT, STR, Kind, exactly, opt, req
from ..record import Family, always, grouped_if, never, norm_topk_prob
from ..routing import SigmoidGroupLimited, SoftmaxGroupLimited, SoftmaxTopK, softmax_top_k

EXPERT_KEYS = ("n_routed_experts", "num_local_experts")
_RULES = {
    "intermediate_size": opt(POS_INT),  # the dense layers' MLP
    "num_key_value_heads": opt(POS_INT, nullable=True),  # null: as many as attention heads
    "n_shared_experts": opt(NONNEG_INT),
    "first_k_dense_replace": opt(NONNEG_INT),  # null builds no model in transformers (compared with a layer index)
    "routed_scaling_factor": opt(POS_FLOAT),
    "norm_topk_prob": opt(BOOL, nullable=True),
    "q_lora_rank": opt(POS_INT, nullable=True),  # null: no query compression
    "kv_lora_rank": opt(POS_INT),
    "qk_nope_head_dim": opt(POS_INT),
    "qk_rope_head_dim": opt(POS_INT),
    "v_head_dim": opt(POS_INT),
}
_TINY = dict(moe_intermediate_size=32, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_routed_experts=8,
             num_experts_per_tok=2)
# DeepSeek-MoE-16B's published config.json (deepseek-ai/deepseek-moe-16b-base), with the sizes scaled down.
DEEPSEEK_MOE_16B_CONFIG = {
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                 "AutoModel": "modeling_deepseek.DeepseekModel",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 1, "eos_token_id": 2, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 128, "model_type": "deepseek", "moe_intermediate_size": 32, "moe_layer_freq": 1,
    "n_routed_experts": 8, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4,
    "num_experts_per_tok": 3, "num_hidden_layers": 3, "num_key_value_heads": 4, "pretraining_tp": 1,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
    "vocab_size": 256,
}


def routed_scaling_factor(config: dict, default: float = 1.0) -> float:
    value = config.get("routed_scaling_factor", default)
    return float(default if value is None else value)


def after_dense(config: dict, i: int, default: int = 0) -> bool:
    """The first `first_k_dense_replace` layers are dense (absent: the config class's default)."""
    return i >= (config.get("first_k_dense_replace", default) or 0)


def deepseek_moe_layer(config: dict, i: int) -> bool:
    """DeepSeek-MoE-16B: after the dense layers, every `moe_layer_freq`-th layer."""
    return i >= (config.get("first_k_dense_replace") or 0) and i % (config.get("moe_layer_freq") or 1) == 0


def is_layer_type_list(value) -> bool:
    return isinstance(value, list) and all(v in ("dense", "sparse") for v in value)


MLP_LAYER_TYPES = Kind('a list of "dense" or "sparse", one per layer', is_layer_type_list)


def sparse_layer(config: dict, i: int, dense_key: str | None = "first_k_dense_replace", dense: int = 1) -> bool:
    """GLM-4.7-Flash, GLM-5, Kimi-Linear (and K-EXAONE, MiniCPM-5-MoE, Cohere2-MoE: sigmoid_grouped.py,
    softmax_topk.py): `mlp_layer_types[i] == "sparse"` where config.json lists them, else the config class's own
    list: the first `dense_key` layers dense (`dense` where it is absent or the class ignores it, dense_key None)."""
    types = config.get("mlp_layer_types")
    if types is None:
        return i >= ((config.get(dense_key, dense) if dense_key else dense) or 0)
    layers = config["num_hidden_layers"]
    if len(types) < layers:
        raise ValueError(f"mlp_layer_types lists {len(types)} layers, num_hidden_layers is {layers}")
    return types[i] == "sparse"


def v2_router(config: dict) -> SoftmaxTopK | SoftmaxGroupLimited:
    if config.get("topk_method", "greedy") == "group_limited_greedy":
        return SoftmaxGroupLimited(config["num_experts_per_tok"], config["n_group"], config["topk_group"])
    return softmax_top_k(config)


def v2_uses_groups(config: dict) -> bool:
    return config.get("topk_method") == "group_limited_greedy"


def v2_grouped(config: dict) -> bool:
    return v2_uses_groups(config) and grouped_if(config)


def sigmoid_grouped_router(config: dict) -> SigmoidGroupLimited:
    """DeepSeek-V3 `noaux_tc`: sigmoid scores, the choice on scores + bias within the best groups."""
    return SigmoidGroupLimited(config["num_experts_per_tok"], config.get("n_group") or 1, config.get("topk_group") or 1)


# The transformers class each family built by v3_like is: config.json's `architectures` names it.
CAUSAL_LM_CLASSES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                     "glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
                     "dots1": "Dots1ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM",
                     "sarvam_moe": "Glm4MoeForCausalLM"}  # (glm4_moe's, first in the catalog: names find that)


def v3_like(model_type: str, scale: float, rules: dict, tiny: dict, groups: tuple[int, int] | None = None,
            dense: int = 3, tiny_extra: dict | None = None, renormalise: bool = True,
            moe_layer: Callable[[dict, int], bool] | None = None, expert_keys: tuple[str, ...] = EXPERT_KEYS,
            architecture: str | None = None) -> Family:
    """DeepSeek-V3 and the families built on its MoE block. `scale`: the config class's default
    routed_scaling_factor; `groups`: its default n_group, topk_group where it may leave them out; `dense`: its
    default first_k_dense_replace (or `moe_layer`, where the config says otherwise which layers are MoE layers);
    `renormalise`: its default norm_topk_prob; `architecture`: its class, where CAUSAL_LM_CLASSES does not list it."""
    return Family(
        model_type=model_type,
        architectures=(architecture or CAUSAL_LM_CLASSES[model_type],),
        expert_count_keys=expert_keys,
        intermediate_key="moe_intermediate_size",
        make_router=sigmoid_grouped_router,
        bias="mlp.gate.e_score_correction_bias",
        shared_count_key="n_shared_experts",
        grouped_routing=grouped_if,
        uses_groups=always,
        group_defaults=groups,
        moe_layer=moe_layer or partial(after_dense, default=dense),
        min_group_experts=2,
        renormalises=partial(norm_topk_prob, default=renormalise),
        routed_scale=partial(routed_scaling_factor, default=scale),
        config_rules=rules,
        tiny_config=tiny,
        tiny_config_extra=tiny_extra or {},
    )


ONE = exactly(1, "1 (dern-stream reads Kimi-Linear's routing as one group)")
W123 = ("w1", "w3", "w2")  # gate, up, down (Kimi-Linear's experts on disk)


def kimi_top_k(config: dict) -> int:
    return config.get("num_experts_per_token", config.get("num_experts_per_tok"))


def kimi_router(config: dict) -> SigmoidGroupLimited:
    """Kimi-Linear: DeepSeek-V3's router (sigmoid, the choice on scores + correction bias), in one group."""
    return SigmoidGroupLimited(kimi_top_k(config), 1, 1)


def kimi_renormalises(config: dict) -> bool:
    """`moe_renormalize` (KimiLinearConfig's name for norm_topk_prob), default true."""
    value = config.get("moe_renormalize", config.get("norm_topk_prob", True))
    return True if value is None else bool(value)


_V3_GROUPS = {"n_group": req(POS_INT), "topk_group": req(POS_INT)}  # absent, transformers would assume 8 and 4
_V3_TINY = dict(_TINY, q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)

_MLA_RULES = {k: _RULES[k] for k in ("intermediate_size", "num_key_value_heads", "n_shared_experts",
                                      "routed_scaling_factor", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                      "v_head_dim")}
_ONE_GROUP_DEFAULT = {"n_group": opt(POS_INT), "topk_group": opt(POS_INT)}  # absent: 1 (the config classes' default)
_MLA_TINY = {k: _TINY[k] for k in ("moe_intermediate_size", "intermediate_size", "n_shared_experts", "kv_lora_rank",
                                   "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_routed_experts",
                                   "num_experts_per_tok")}

FAMILIES = (
    # DeepSeek-MoE-16B (the DERN paper's third model): remote code only, so its on-disk layout is all there is to go
    # by (published config.json and modeling_deepseek.py): softmax top-k, weights as they are.
    Family(
        model_type="deepseek",
        architectures=("DeepseekForCausalLM",),
        moe_layer=deepseek_moe_layer,
        expert_count_keys=("n_routed_experts",),
        intermediate_key="moe_intermediate_size",
        make_router=softmax_top_k,
        shared_count_key="n_shared_experts",
        remote_code=True,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "n_shared_experts": opt(NONNEG_INT, nullable=True),
            "first_k_dense_replace": opt(NONNEG_INT),
            "moe_layer_freq": opt(POS_INT),
            "norm_topk_prob": opt(BOOL),
            "scoring_func": opt(STR, choices=("softmax",)),
        },
        tiny_config=DEEPSEEK_MOE_16B_CONFIG,
    ),
    Family(
        model_type="deepseek_v2",
        architectures=("DeepseekV2ForCausalLM",),
        moe_layer=after_dense,
        expert_count_keys=EXPERT_KEYS,
        intermediate_key="moe_intermediate_size",
        make_router=v2_router,
        shared_count_key="n_shared_experts",
        grouped_routing=v2_grouped,
        uses_groups=v2_uses_groups,
        renormalises=never,  # transformers' DeepSeek-V2 ignores norm_topk_prob
        routed_scale=routed_scaling_factor,
        config_rules={
            **_RULES,
            # null: greedy routing does not use groups (group_limited_greedy needs both: record.routing_problem)
            "n_group": opt(POS_INT, nullable=True),
            "topk_group": opt(POS_INT, nullable=True),
            "topk_method": opt(STR, choices=("greedy", "group_limited_greedy")),
        },
        tiny_config=dict(_TINY, q_lora_rank=None, topk_method="greedy"),
    ),
    # vLLM reads scoring_func and topk_method from config.json although DeepseekV3Config does not keep them.
    v3_like("deepseek_v3", 2.5, {**_RULES, **_V3_GROUPS}, _V3_TINY,
            tiny_extra={"scoring_func": "sigmoid", "topk_method": "noaux_tc"}),
    v3_like("deepseek_v32", 2.5, {**_RULES, **_V3_GROUPS, "index_topk": opt(POS_INT), "index_n_heads": opt(POS_INT),
                                  "index_head_dim": opt(POS_INT)},
            dict(_V3_TINY, index_n_heads=2, index_head_dim=16, index_topk=64, num_key_value_heads=4)),
    v3_like("glm4_moe", 1.0, {
        "num_key_value_heads": opt(POS_INT),
        "head_dim": opt(POS_INT, nullable=True),
        "intermediate_size": opt(POS_INT),
        "n_shared_experts": opt(NONNEG_INT),
        "first_k_dense_replace": opt(NONNEG_INT),
        "routed_scaling_factor": opt(POS_FLOAT),
        "norm_topk_prob": opt(BOOL),
        "n_group": opt(POS_INT),  # absent: 1 (Glm4MoeConfig's default)
        "topk_group": opt(POS_INT),
        "num_nextn_predict_layers": opt(NONNEG_INT),
    }, dict(moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=16,
            routed_scaling_factor=1.5, pad_token_id=1, bos_token_id=1, eos_token_id=2), groups=(1, 1), dense=1),
    # GLM-4.7-Flash: MLA attention; MoE layers as `mlp_layer_types` says (absent: all but the first, whatever
    # first_k_dense_replace says, as Glm4MoeLiteConfig builds them).
    v3_like("glm4_moe_lite", 1.8, {
        **_MLA_RULES, **_ONE_GROUP_DEFAULT,
        "q_lora_rank": opt(POS_INT, nullable=True),
        "norm_topk_prob": opt(BOOL),
        "mlp_layer_types": opt(MLP_LAYER_TYPES, nullable=True),
        "num_nextn_predict_layers": opt(NONNEG_INT),
    }, dict(_MLA_TINY, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=1.8),
        groups=(1, 1), moe_layer=partial(sparse_layer, dense_key=None, dense=1)),
    # dots.llm1: Qwen-style attention, DeepSeek-V3's MoE block; not renormalised unless norm_topk_prob says so.
    v3_like("dots1", 1.0, {
        **_ONE_GROUP_DEFAULT,
        "num_key_value_heads": opt(POS_INT),
        "intermediate_size": opt(POS_INT),
        "n_shared_experts": opt(NONNEG_INT),
        "first_k_dense_replace": opt(NONNEG_INT),  # null builds no model (compared with a layer index)
        "routed_scaling_factor": opt(POS_FLOAT),
        "norm_topk_prob": opt(BOOL, nullable=True),
    }, dict(moe_intermediate_size=32, intermediate_size=96, n_shared_experts=1, first_k_dense_replace=1,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=False,
            routed_scaling_factor=2.5), groups=(1, 1), dense=0, renormalise=False),
)

FAMILIES += (
    # GLM-5: DeepSeek-V3.2's sparse attention and GLM-4.7-Flash's MoE block; `num_experts`, where config.json holds
    # it, overrides n_routed_experts. (The streamed forward with the _Recorder change runs `indexer_types` "full", the
    # default; a "shared" layer reuses the previous layer's top-k, which it does not carry between layers.)
    v3_like("glm_moe_dsa", 2.5, {
        **_MLA_RULES, **_ONE_GROUP_DEFAULT,
        "q_lora_rank": opt(POS_INT),
        "norm_topk_prob": opt(BOOL),
        "first_k_dense_replace": opt(NONNEG_INT),
        "mlp_layer_types": opt(MLP_LAYER_TYPES, nullable=True),
        "num_nextn_predict_layers": opt(NONNEG_INT),
        "index_topk": opt(POS_INT), "index_n_heads": opt(POS_INT), "index_head_dim": opt(POS_INT),
    }, dict(_MLA_TINY, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1, index_n_heads=2,
            index_head_dim=16, index_topk=64, num_key_value_heads=4),
        groups=(1, 1), moe_layer=partial(sparse_layer, dense=3), expert_keys=(*EXPERT_KEYS, "num_experts")),
    # Kimi-Linear: KDA linear attention (copied like any attention) and MLA layers; DeepSeek-V3's MoE block in
    # Mixtral's layout (block_sparse_moe, w1/w3/w2) under KimiLinearConfig's own key names. Its groups are read as
    # one: the group keys are num_expert_group / topk_group, which the group handling here does not rewrite.
    Family(
        model_type="kimi_linear",
        architectures=("KimiLinearForCausalLM",),
        expert_count_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_token", "num_experts_per_tok"),
        intermediate_key="moe_intermediate_size",
        make_router=kimi_router,
        router="block_sparse_moe.gate.weight",
        experts="block_sparse_moe.experts.{e}.{proj}.weight",
        proj_names=W123,
        bias="block_sparse_moe.gate.e_score_correction_bias",
        # (in memory, on disk): the KDA forget gate's weights sit under the attention on disk
        memory_names=(("mlp.", "block_sparse_moe."), ("self_attn.forget_gate.", "self_attn.")),
        # the KDA short convolution: in memory the three on-disk ones concatenated (transformers' WeightConverter)
        memory_concatenations=(("self_attn.conv1d.weight", ("self_attn.q_conv1d.weight", "self_attn.k_conv1d.weight",
                                                             "self_attn.v_conv1d.weight")),),
        shared_count_key="num_shared_experts",
        moe_layer=partial(sparse_layer, dense=1),
        min_group_experts=2,  # one group, still scored by its top two experts
        renormalises=kimi_renormalises,
        routed_scale=partial(routed_scaling_factor, default=2.446),
        config_rules={
            "num_key_value_heads": opt(POS_INT, nullable=True),
            "intermediate_size": opt(POS_INT),
            "num_shared_experts": opt(NONNEG_INT),
            "first_k_dense_replace": opt(NONNEG_INT),
            "mlp_layer_types": opt(MLP_LAYER_TYPES, nullable=True),
            "routed_scaling_factor": opt(POS_FLOAT),
            "moe_renormalize": opt(BOOL),
            "norm_topk_prob": opt(BOOL),
            "num_expert_group": opt(ONE),
            "n_group": opt(ONE),
            "topk_group": opt(ONE),
            "kv_lora_rank": opt(POS_INT),
            "qk_nope_head_dim": opt(POS_INT),
            "qk_rope_head_dim": opt(POS_INT),
            "v_head_dim": opt(POS_INT, nullable=True),
        },
        tiny_config=dict(moe_intermediate_size=32, intermediate_size=96, num_shared_experts=1, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_experts=8, num_experts_per_token=2,
                         first_k_dense_replace=1, linear_head_dim=16, linear_num_heads=2,
                         layer_types=["linear_attention", "full_attention", "linear_attention"],
                         pad_token_id=1, bos_token_id=1, eos_token_id=2),
    ),
)

# Sarvam-MoE: transformers builds it as GLM-4.5 (Glm4MoeForCausalLM with SarvamMoEConfig) and loads its checkpoint from
# the original names, which dern-stream reads and writes as they are: the embedding `model.word_embeddings`, the
# attention `attention.*` with one fused `query_key_value` (split into q, k and v rows in memory) and `dense`, the
# correction bias `mlp.gate.expert_bias`. Experts and router are GLM-4.5's.
SARVAM_ATTENTION = (("self_attn.o_proj.", "attention.dense."), ("self_attn.q_norm.", "attention.query_layernorm."),
                    ("self_attn.k_norm.", "attention.key_layernorm."), ("self_attn.", "attention."),
                    ("mlp.gate.e_score_correction_bias", "mlp.gate.expert_bias"))
FAMILIES += (
    replace(
        v3_like("sarvam_moe", 2.5, {
            "num_key_value_heads": opt(POS_INT),
            "head_dim": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "n_shared_experts": opt(NONNEG_INT),
            "first_k_dense_replace": opt(NONNEG_INT),
            "routed_scaling_factor": opt(POS_FLOAT),
            "norm_topk_prob": opt(BOOL),
            "n_group": opt(POS_INT),  # absent: 1 (SarvamMoEConfig's default)
            "topk_group": opt(POS_INT),
        }, dict(moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=16,
                routed_scaling_factor=1.5, initializer_range=0.02), groups=(1, 1), dense=1,
            expert_keys=(*EXPERT_KEYS, "num_experts")),
        bias="mlp.gate.expert_bias",
        memory_names=SARVAM_ATTENTION,
        model_memory_names=(("model.embed_tokens.", "model.word_embeddings."),),
        memory_splits=(("attention.query_key_value.",
                        ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")),),
    ),
)

# GLM-4.5V: the multimodal model whose language model is GLM-4.5's (its config defaults the same), the vision tower
# copied untouched (checkpoint/config_view.py reads its text_config)
_GLM4_MOE = next(f for f in FAMILIES if f.model_type == "glm4_moe")
FAMILIES += (replace(
    _GLM4_MOE, model_type="glm4v_moe", architectures=("Glm4vMoeForConditionalGeneration",),
    layers="model.language_model.layers", multimodal=True,
    # (its multimodal rotary sections sum to half the rotated head dims: 16 x 0.5 / 2)
    tiny_config=dict(text_config=dict(_GLM4_MOE.tiny_config, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, image_size=28))),)
