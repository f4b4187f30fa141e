"""A config.json checked against its family's rules (config_rules.py) before any command does any work: the first
value of the wrong type or range, or a routing the config cannot do, is one clear line."""

from __future__ import annotations

import json

from ..errors import DernError
from .config_rules import COMMON, POS_INT, Rule, opt, req
from .record import Family


def rules_for(family: Family) -> dict[str, Rule]:
    """The table for `family`: common keys, its expert count and width keys, its own keys."""
    common = {(family.layers_key if k == "num_hidden_layers" else k): rule for k, rule in COMMON.items()}
    return {**common, **{k: opt(POS_INT) for k in (*family.expert_count_keys, *family.top_k_keys)},
            family.intermediate_key: req(POS_INT), **family.config_rules}


def show(value) -> str:
    """A config value as config.json spells it, with what it is when that is not plain from the text."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    what = {str: "a string", bool: "a boolean", float: "a float", list: "a list", dict: "an object"}.get(type(value))
    return f"{text} ({what})" if what else text


def _bad(key: str, value, expected: str) -> DernError:
    return DernError(f"config.json: {key} is {show(value)}; expected {expected}")


def check_model_type(config: dict) -> None:
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise _bad("model_type", model_type, "a string")


def check_config(config: dict, family: Family) -> None:
    """Raise DernError naming the first config.json value of the wrong type or range (see the module doc)."""
    for key, rule in rules_for(family).items():
        if key not in config:
            if rule.required:
                raise DernError(f"config.json: {key} is missing; expected {rule.expected()}")
            continue
        value = config[key]
        if value is None and rule.nullable:
            continue
        if not rule.kind.accepts(value) or (rule.choices and value not in rule.choices):
            raise _bad(key, value, rule.expected())
    layers, hidden = config[family.layers_key], config.get("num_hidden_layers")
    per_layer = family.hidden_layers_per_layer
    if family.layers_key != "num_hidden_layers" and hidden is not None and hidden != per_layer * layers:
        raise DernError(f"config.json: num_hidden_layers is {show(hidden)} but {family.layers_key} is {layers}; "
                        f"{family.model_type} derives num_hidden_layers as {family.hidden_layers_per_layer} x "
                        f"{family.layers_key}")
    top_ks = [k for k in family.top_k_keys if k in config]
    if not top_ks:
        raise DernError(f"config.json: {' or '.join(family.top_k_keys)} is missing; expected a positive integer "
                        "(the experts each token is routed to)")
    if any(config[k] != config[top_ks[0]] for k in top_ks):
        raise DernError(f"config.json: {top_ks[0]} is {config[top_ks[0]]} but {top_ks[1]} is {config[top_ks[1]]}; "
                        "both give the experts each token is routed to")
    present = [k for k in family.expert_count_keys if k in config]
    if not present:
        raise DernError(f"config.json: {' or '.join(family.expert_count_keys)} is missing; expected a positive "
                        "integer (the number of routed experts)")
    experts, first = config[present[0]], present[0]
    for other in present[1:]:
        if config[other] != experts:
            raise DernError(f"config.json: {first} is {experts} but {other} is {config[other]}; "
                            "both give the number of routed experts")
    problem = family.routing_problem(config)
    if problem is not None:
        raise DernError(f"config.json cannot route: {problem}")
