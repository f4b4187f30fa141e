"""config.json seen as one flat dict of the language model's settings, as a plain text model's is.

Two layouts keep those settings elsewhere:
- a composite (multimodal) model keeps its language model's under `text_config` (Qwen3-VL-MoE, Qwen3.5-MoE, Llama 4,
  Gemma 4, GLM-4.5V; Qwen3-Omni-MoE under `thinker_config.text_config`), beside the vision and audio towers' own
  sections. The view is that section's keys (transformers reads no other for the language model), with the top
  level's identity (model_type, architectures, auto_map) and quantization_config, which a composite model keeps
  there, and the section itself (so that the view of a view is the same);
- a family may keep part of its own settings in a sub-config and name some keys its own way (DBRX: the experts'
  in `ffn_config`, the width as `d_model`). The family's record registers them (NESTED, filled by families/); the
  view is the top level, the sections' keys over it (transformers reads those), and each alias under the name every
  family reads.
A rewrite's changes to the view go back where each key was read from (file_config)."""

from __future__ import annotations

import copy

SECTION = "text_config"
# Where a composite model keeps its language model's config, in the order looked for (Qwen3-Omni-MoE: its thinker's,
# beside the talker's)
TEXT_SECTIONS = ((SECTION,), ("thinker_config", SECTION))
# Keys a composite model keeps at its top level whatever text_config says: they describe the whole checkpoint.
_TOP_LEVEL = ("model_type", "architectures", "auto_map", "quantization_config")
# model_type -> (sub-configs read as the top level's, (name read, config.json's key) aliases): families/ registers them
NESTED: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {}


def text_section(config: dict) -> tuple[str, ...] | None:
    """The path of keys to a composite model's language model's config, or None."""
    return next((path for path in TEXT_SECTIONS if isinstance(lookup(config, path)[1], dict)), None)


def lookup(config: dict, path: tuple[str, ...]) -> tuple[bool, object]:
    """(whether config.json holds the value at this path of keys, the value or None)."""
    value = config
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def is_composite(config: dict) -> bool:
    return text_section(config) is not None


def config_view(config: dict) -> dict:
    """The language model's settings of config.json: `config` itself unless it is laid out as the module doc says."""
    sources = _sources(config)
    if sources is None:
        return config
    return {key: lookup(config, path)[1] for key, path in sources.items()}


def file_config(config: dict, view: dict, changed: dict) -> dict:
    """config.json for `changed`, a rewrite's version of `view` (config_view(config)): each key that differs from
    `view` set (or removed) where config_view read it from (a new key: the language model's section, or the top
    level); everything else of `config` as it was."""
    sources = _sources(config)
    if sources is None:
        return changed
    out = copy.deepcopy(config)
    for key in {*view, *changed}:
        if key in view and key in changed and view[key] == changed[key]:
            continue
        path = sources.get(key) or (*(text_section(config) or ()), key)
        target = out
        for step in path[:-1]:
            target = target[step]
        if key in changed:
            target[path[-1]] = copy.deepcopy(changed[key])
        else:
            target.pop(path[-1], None)
    return out


def _sources(config: dict) -> dict[str, tuple[str, ...]] | None:
    """Each key of the view -> where config.json holds it (a path of keys); None where the view is config itself."""
    section = text_section(config)
    if section is not None:
        # transformers builds the language model from its section alone (a key it lacks takes the config class's
        # default, never the top level's), and the section itself stays in the view, so that the view of a view is
        # the same view and a refusal can still name the language model's model_type
        sources = {key: (*section, key) for key in lookup(config, section)[1]}
        sources.update({key: (key,) for key in (*_TOP_LEVEL, section[0]) if key in config})
        return sources
    model_type = config.get("model_type")
    nested = NESTED.get(model_type) if isinstance(model_type, str) else None
    if nested is None:
        return None
    sections, aliases = nested
    # (a section's keys over the top level's, as transformers reads them, but for the checkpoint's identity; the
    # model's own key over a copy a section may hold: DBRX's d_model over ffn_config.hidden_size)
    sources = {key: (key,) for key in config}
    for section in sections:
        if isinstance(config.get(section), dict):
            sources.update({key: (section, key) for key in config[section] if key not in _TOP_LEVEL})
    for name, key in aliases:
        if key in config:
            sources[name] = (key,)
    return sources
