"""Model families, chosen by config.json's `model_type`."""

from ..errors import DernError
from . import deepseek, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import PARTS, Family, GroupPlan
from .config_check import check_config, check_model_type

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY,
        deepseek.DEEPSEEK_V2, deepseek.DEEPSEEK_V3,
    )
}

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def family_for(config: dict) -> Family:
    check_model_type(config)
    model_type = config.get("model_type")
    if model_type not in FAMILIES and not any(k in config for k in _EXPERT_COUNT_KEYS):
        raise DernError(f"model_type {model_type!r} is not a Mixture-of-Experts model (config.json has no expert "
                        f"count); dern-stream shrinks MoE models: {', '.join(sorted(FAMILIES))}")
    if model_type not in FAMILIES:
        raise DernError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    check_config(config, family)  # value types and ranges, before any command does any work
    return family


__all__ = ["FAMILIES", "PARTS", "Family", "GroupPlan", "family_for"]
