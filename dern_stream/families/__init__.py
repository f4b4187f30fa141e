"""Model families, one record each (record.py; every record: catalog/), chosen by config.json's `model_type`."""

from ..checkpoint.config_view import NESTED, config_view, text_section
from ..errors import DernError
from .catalog import all_families
from .config_check import check_config, check_model_type, show
from .record import PARTS, Family, GroupPlan

FAMILIES: dict[str, Family] = {f.model_type: f for f in all_families()}
# The config layouts the records declare, for every Checkpoint's config view (checkpoint/config_view.py)
NESTED.update({f.model_type: (f.config_sections, f.config_aliases) for f in FAMILIES.values()
               if f.config_sections or f.config_aliases})

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# MoE model_types transformers ships that no record can take, and why (docs/formats.md lists them)
_NO_CAUSAL_LM = "transformers has no class that loads this text model alone (its multimodal model, {}, is supported)"
REFUSED = {
    "qwen3_vl_moe_text": _NO_CAUSAL_LM.format("qwen3_vl_moe"),
    "glm4v_moe_text": _NO_CAUSAL_LM.format("glm4v_moe"),
    "qwen3_omni_moe_text": _NO_CAUSAL_LM.format("qwen3_omni_moe"),
}


def family_for(config: dict) -> Family:
    """The family of a config.json: by its model_type, else by the class its `architectures` or `auto_map` names
    (a model_type of its own whose remote code is a supported family's, as Kimi-K2's), checked. A multimodal
    model's config is read as its language model's (checkpoint/config_view.py), as Checkpoint.config is."""
    check_model_type(config)
    _check_sections(config)
    view = config_view(config)
    model_type = view.get("model_type")
    family = FAMILIES.get(model_type) or _named_family(view)
    if family is not None:
        for section in family.config_sections:  # (DBRX's ffn_config)
            if section in config and not isinstance(config[section], dict):
                raise DernError(f"config.json: {section} is {show(config[section])}; expected a JSON object")
        check_config(view, family)  # value types and ranges, before any command does any work
        return family
    if model_type in REFUSED:
        raise DernError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    inner = _moe_section(config)
    if inner is not None:
        multimodal = sorted(t for t, f in FAMILIES.items() if f.multimodal)
        raise DernError(f"model_type {model_type!r} is a multimodal checkpoint whose text model is a "
                        f"Mixture-of-Experts model ({inner}); its layout is not supported yet (multimodal models "
                        f"supported: {', '.join(multimodal)})")
    if not any(k in view for k in _EXPERT_COUNT_KEYS):
        raise DernError(f"model_type {model_type!r} is not a Mixture-of-Experts model (config.json has no expert "
                        f"count); dern-stream shrinks MoE models: {', '.join(sorted(FAMILIES))}")
    raise DernError(f"model_type {model_type!r} is not supported (nor is a class its config.json names); supported "
                    f"families: {', '.join(sorted(FAMILIES))}")


def _check_sections(config: dict) -> None:
    """A language model's section (text_config, Qwen3-Omni-MoE's thinker_config.text_config) that is not an object is
    named as such, rather than its keys as missing."""
    for path in (("text_config",), ("thinker_config",), ("thinker_config", "text_config")):
        value, present = config, True
        for key in path:
            present = isinstance(value, dict) and key in value
            value = value.get(key) if present else None
        if present and not isinstance(value, dict):
            raise DernError(f"config.json: {'.'.join(path)} is {show(value)}; expected a JSON object (the language "
                            "model's config)")


def _moe_section(config: dict) -> str | None:
    """The model_type of a multimodal model's language model whose config holds an expert count, or None."""
    section = text_section(config)
    if section is None:
        return None
    text = config
    for key in section:
        text = text[key]
    return str(text.get("model_type") or section[-1]) if any(k in text for k in _EXPERT_COUNT_KEYS) else None


def _named_family(config: dict) -> Family | None:
    """The family whose causal-LM class config.json names in `architectures` or `auto_map`, or None."""
    names = [a for a in config.get("architectures") or [] if isinstance(a, str)] \
        if isinstance(config.get("architectures"), list) else []
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict):
        for refs in auto_map.values():  # "module.Class", or "repo--module.Class", or a list of such
            names += [r.rsplit(".", 1)[-1] for r in (refs if isinstance(refs, list) else [refs]) if isinstance(r, str)]
    return next((f for name in names for f in FAMILIES.values() if name in f.architectures), None)


def require_forward(family: Family) -> None:
    """dump and eval run the model's forward in transformers: refuse families it has no class for."""
    if family.remote_code:
        raise DernError(f"{family.model_type} models have no transformers class (they run as remote code), so dump "
                        "and eval cannot run their forward; make the dump in Python with "
                        "dern_stream.calib.dump_from_model on the model loaded with trust_remote_code=True")


__all__ = ["FAMILIES", "PARTS", "Family", "GroupPlan", "family_for", "require_forward"]
