"""The values config.json keys may hold (config_check.py checks a config against them before any work).

A table of the keys every family shares here, and one per family in its record (catalog/): key -> the kind of value
it must hold, whether the family cannot do without it (`required`), and whether null is allowed (only where the
family's transformers config class treats null as "use the default" or as a meaningful choice, e.g. DeepSeek's
`q_lora_rank: null` = no query compression). Ints are not floats' only spelling (a positive number may be written
`2`), but a bool is never an int here, and a float is never an int (`64.0` is refused where a count belongs), as in
transformers' own strict config classes. Keys outside the table are left to transformers, whose errors
dump/eval/verify turn into one line as well (stream/executor.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial


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


def same_value(value, v) -> bool:
    """`v` is `value` itself: of its type (true is not 1, 1.0 is not 1) and equal to it."""
    return type(v) is type(value) and v == value


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


def exactly(value: object, expected: str) -> Kind:
    """The one value a family supports for a key (`expected` says so, and why)."""
    return Kind(expected, partial(same_value, value))


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


