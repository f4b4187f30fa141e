"""Model families, one record each (record.py; every record: catalog/), chosen by config.json's `model_type`."""

from ..errors import DernError
from .catalog import all_families
from .config_check import check_config, check_model_type
from .record import PARTS, Family, GroupPlan

FAMILIES: dict[str, Family] = {f.model_type: f for f in all_families()}

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


def require_forward(family: Family) -> None:
    """dump and eval run the model's forward in transformers: refuse families it has no class for."""
    if family.remote_code:
        raise DernError(f"{family.model_type} models have no transformers class (they run as remote code), so dump "
                        "and eval cannot run their forward; make the dump in Python with "
                        "dern_stream.calib.dump_from_model on the model loaded with trust_remote_code=True")


__all__ = ["FAMILIES", "PARTS", "Family", "GroupPlan", "family_for", "require_forward"]
