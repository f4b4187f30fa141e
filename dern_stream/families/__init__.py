"""Model families, one record each (record.py; every record: catalog/), chosen by config.json's `model_type`."""

from ..checkpoint.config_view import NESTED, TEXT_SECTIONS, config_view, lookup, text_section
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
    # (a language model's section that is not an object is named as such, rather than its keys as missing)
    _check_objects(config, {path[:n] for path in TEXT_SECTIONS for n in range(1, len(path) + 1)},
                   " (the language model's config)")
    view = config_view(config)
    model_type = view.get("model_type")
    family = FAMILIES.get(model_type) or _named_family(view)
    if family is not None:
        _check_objects(config, {(section,) for section in family.config_sections})  # (DBRX's ffn_config)
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


def _check_objects(config: dict, paths: set[tuple[str, ...]], what: str = "") -> None:
    """Refuse a value config.json holds at one of `paths` (of keys) that is not a JSON object."""
    for path in sorted(paths):
        present, value = lookup(config, path)
        if present and not isinstance(value, dict):
            raise DernError(f"config.json: {'.'.join(path)} is {show(value)}; expected a JSON object{what}")


def _moe_section(config: dict) -> str | None:
    """The model_type of a multimodal model's language model whose config holds an expert count, or None."""
    section = text_section(config)
    text = lookup(config, section)[1] if section is not None else {}
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
