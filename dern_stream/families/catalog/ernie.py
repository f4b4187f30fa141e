"""ERNIE-4.5 MoE: softmax; the choice on softmax + `mlp.moe_statics.e_score_correction_bias` ([1, N]);
renormalised; top-`moe_k`. Its shared experts keep their width by rescaling `moe_num_shared_experts`."""

from __future__ import annotations

from ..config_rules import NONNEG_INT, POS_FLOAT, POS_INT, Kind, opt
from ..record import Family, always
from ..routing import SoftmaxBiasedChoice


def ernie_router(config: dict) -> SoftmaxBiasedChoice:
    return SoftmaxBiasedChoice(config.get("moe_k", config.get("num_experts_per_tok")))


def ernie_moe_layer(config: dict, i: int) -> bool:
    """Every `moe_layer_interval`-th layer from `moe_layer_start_index` to `moe_layer_end_index` (-1: the last)."""
    end = config.get("moe_layer_end_index", -1)
    end = config["num_hidden_layers"] - 1 if end in (-1, None) else end
    start = config.get("moe_layer_start_index", 1)
    return (i + 1) % (config.get("moe_layer_interval") or 1) == 0 and (1 if start is None else start) <= i <= end


def layer_index_or_last(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= -1


FAMILIES = (
    Family(
        model_type="ernie4_5_moe",
        architectures=("Ernie4_5_MoeForCausalLM",),
        moe_layer=ernie_moe_layer,
        expert_count_keys=("moe_num_experts", "num_experts"),
        intermediate_key="moe_intermediate_size",
        make_router=ernie_router,
        bias="mlp.moe_statics.e_score_correction_bias",
        top_k_keys=("moe_k", "num_experts_per_tok"),
        memory_names=(("mlp.gate.moe_statics.", "mlp.moe_statics."),),
        shared_count_key="moe_num_shared_experts",
        renormalises=always,
        drops_mtp=True,
        config_rules={
            "num_key_value_heads": opt(POS_INT),
            "intermediate_size": opt(POS_INT),
            "moe_num_shared_experts": opt(NONNEG_INT),
            "moe_layer_start_index": opt(NONNEG_INT),
            "moe_layer_end_index": opt(Kind("an integer from -1 (the last layer) up", layer_index_or_last)),
            "moe_layer_interval": opt(POS_INT),
            "moe_norm_min": opt(POS_FLOAT),
        },
        tiny_config=dict(moe_intermediate_size=32, intermediate_size=96, moe_num_experts=8, moe_k=2,
                         moe_layer_start_index=1, moe_num_shared_experts=1),
    ),
)
