"""config.json value types, checked before any work: a wrong type or range is one clear line, not a traceback.

A table of the keys every family shares here, and one per family in its record (catalog/): key -> the kind of
value it must hold, whether the family cannot do without it
(`required`), and whether null is allowed (only where the family's transformers config class treats
null as "use the default" or as a meaningful choice, e.g. DeepSeek's `q_lora_rank: null` = no query
compression). Ints are not floats' only spelling (a positive number may be written `2`), but a bool is
never an int here, and a float is never an int (`64.0` is refused where a count belongs), as in
transformers' own strict config classes. Keys outside the table are left to transformers, whose
errors dump/eval/verify turn into one line as well (stream/executor.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DernError

if TYPE_CHECKING:
    from .record import Family


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
    return _is_int(v) and v >= 1


def nonnegative_int(v) -> bool:
    return _is_int(v) and v >= 0


def positive_number(v) -> bool:
    return _is_number(v) and v > 0


def nonnegative_number(v) -> bool:
    return _is_number(v) and v >= 0


def boolean(v) -> bool:
    return isinstance(v, bool)


def string(v) -> bool:
    return isinstance(v, str)


def json_object(v) -> bool:
    return isinstance(v, dict)


@dataclass(frozen=True)
class Kind:
    expected: str
    accepts: Callable[[object], bool]


POS_INT = Kind("a positive integer", positive_int)
NONNEG_INT = Kind("a non-negative integer", nonnegative_int)
POS_FLOAT = Kind("a positive number", positive_number)
NONNEG_FLOAT = Kind("a non-negative number", nonnegative_number)
BOOL = Kind("true or false", boolean)
STR = Kind("a string", string)
OBJECT = Kind("a JSON object", json_object)


@dataclass(frozen=True)
class Rule:
    kind: Kind
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        text = ("one of " + ", ".join(json.dumps(c) for c in self.choices)) if self.choices else self.kind.expected
        return text + (" or null" if self.nullable else "")


def req(kind: Kind) -> Rule:
    return Rule(kind, required=True)


def opt(kind: Kind, nullable: bool = False, choices: tuple[str, ...] = ()) -> Rule:
    return Rule(kind, nullable=nullable, choices=choices)


# The expert count and top-k key(s) and the experts' width key come from the Family (positive integers).
COMMON: dict[str, Rule] = {
    "hidden_size": req(POS_INT),
    "num_hidden_layers": req(POS_INT),
    "vocab_size": opt(POS_INT),
    "num_attention_heads": opt(POS_INT),
    "max_position_embeddings": opt(POS_INT),
    "rms_norm_eps": opt(POS_FLOAT),
    "hidden_act": opt(STR),
    "tie_word_embeddings": opt(BOOL),
    "quantization_config": opt(OBJECT, nullable=True),
}

def rules_for(family: Family) -> dict[str, Rule]:
    """The table for `family`: common keys, its expert count and width keys, its own keys."""
    return {**COMMON, **{k: opt(POS_INT) for k in (*family.expert_count_keys, *family.top_k_keys)},
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
