"""The checks every config dataclass runs first: each field's value has the type its annotation names.

`check_fields(self)` at the start of a config's `__post_init__` turns a wrong type (a float where an integer is
meant, NaN or infinity where a number is, a number where a string is) into one ConfigError naming the field; the
config's own checks then judge ranges and relations between fields. Booleans are not integers here.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any, Sequence

from shared.errors import ConfigError

_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", type(None): "None",
          tuple: "a list"}


def _matches(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # numpy's integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            return False
    origin = typing.get_origin(kind) or kind
    if origin is tuple:  # a sequence field (e.g. primitives): a list is converted by the config
        return isinstance(value, (tuple, list))
    return isinstance(value, origin) if isinstance(origin, type) else True


def _alternatives(kind: Any) -> tuple[Any, ...]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def check_fields(config: Any) -> None:
    """One ConfigError for the first field of dataclass instance `config` whose value is not of its annotated
    type: "<field> must be <an integer | a finite number | a string | ...>, got <value>"."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, kinds = getattr(config, field.name), _alternatives(hints[field.name])
        if not any(_matches(value, kind) for kind in kinds):
            allowed = " or ".join(_WORDS.get(typing.get_origin(kind) or kind, getattr(kind, "__name__", str(kind)))
                                  for kind in kinds)
            raise ConfigError(f"{field.name} must be {allowed}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """One ConfigError unless `value` is one of `choices`: "<name> must be one of a, b, c, got <value>"."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_at_least(config: Any, low: float, *names: str) -> None:
    """One ConfigError unless each named field (None allowed where its type allows it) is >= `low`."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value!r}")


def check_counts(config: Any, unit: str, *names: str) -> None:
    """One ConfigError unless each named field is None (all) or a count >= 1 of `unit` (tokens, images): how many
    of the data's first items a run uses."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not value >= 1):
            raise ConfigError(f"{name} must be a positive number of {unit} or None (all), got {value!r}")
