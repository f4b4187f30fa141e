"""config.json of a composite (multimodal) model seen as its language model's: one flat dict, as a text model's.

A composite config keeps its language model's settings under `text_config` (Qwen3-VL-MoE, Qwen3.5-MoE, Llama 4,
Gemma 4), beside the vision and audio towers' own sections. Every stage reads the language model's keys, so the view
is text_config's keys, then the top level's where text_config has no such key, and the top level's identity
(model_type, architectures, auto_map) and quantization_config, which a composite model keeps there. A rewrite's
changes to the view go back where each key came from (file_config)."""

from __future__ import annotations

import copy

SECTION = "text_config"
# Keys a composite model keeps at its top level whatever text_config says: they describe the whole checkpoint.
_TOP_LEVEL = ("model_type", "architectures", "auto_map", "quantization_config")


def is_composite(config: dict) -> bool:
    return isinstance(config.get(SECTION), dict)


def config_view(config: dict) -> dict:
    """The language model's settings of config.json: `config` itself unless it is composite (the module doc)."""
    if not is_composite(config):
        return config
    view = dict(config[SECTION])
    for key, value in config.items():
        if key == SECTION or (key in view and key not in _TOP_LEVEL):
            continue
        if isinstance(value, dict) and key.endswith("_config") and key != "quantization_config":
            continue  # (another tower's section)
        view[key] = value
    return view


def file_config(config: dict, view: dict, changed: dict) -> dict:
    """config.json for `changed`, a rewrite's version of `view` (config_view(config)): each key that differs from
    `view` set (or removed) where config_view read it from; everything else of `config` as it was."""
    if not is_composite(config):
        return changed
    out = copy.deepcopy(config)
    section = out[SECTION]
    for key in {*view, *changed}:
        if key in view and key in changed and view[key] == changed[key]:
            continue
        top = key in _TOP_LEVEL or (key in config and key not in config[SECTION])
        target = out if top else section
        if key in changed:
            target[key] = copy.deepcopy(changed[key])
        else:
            target.pop(key, None)
    return out
