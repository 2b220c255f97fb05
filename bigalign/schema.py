"""Config keys declared with their constraints, so validation can check every one.

A schema section is a dict of key -> `Key(default, rule)`, a plain default (which
accepts values of the default's type: `Like`), or a nested section (a dict).
`defaults(section)` is the ConfigDict of defaults that configs start from;
`problem(entry, value)` says what is wrong with a value, or None. The rules:

    Integer(low, high)            an int (not a bool) in [low, high]
    Number(low, high, above, below)  an int or float; above/below are strict bounds
    OneOf(values)                 one of fixed values
    Registered(registry)          a name registered in a registry.Registry
    Text(nonempty)                a string
    Path("file" | "directory")    "" (unset) or an existing local file / directory;
                                  paths with a scheme (gs://...) are not checked here
    Sequence(rule)                a tuple or list whose every item obeys `rule`
    Like(default)                 a value of the default's type

Checks that relate several keys (warmup within total_steps, a patch size that
divides the image) stay in config.validate.
"""

import dataclasses
import os
from typing import Any

import ml_collections

from bigalign.errors import UserError


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or a float (a bool is neither here, though Python counts it as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Integer:
    low: int | None = None
    high: int | None = None

    def accepts(self, value) -> bool:
        return (_is_integer(value)
                and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def expects(self) -> str:
        return f"an integer {_bounds(self.low, self.high)}".strip()


@dataclasses.dataclass(frozen=True)
class Number:
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None

    def accepts(self, value) -> bool:
        return (_is_number(value)
                and value == value  # not NaN
                and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high)
                and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))

    def expects(self) -> str:
        bounds = [_bounds(self.low, self.high)] if (self.low, self.high) != (None, None) else []
        bounds += [f"> {self.above}"] * (self.above is not None)
        bounds += [f"< {self.below}"] * (self.below is not None)
        return " ".join(["a number", " and ".join(bounds)]).strip()


@dataclasses.dataclass(frozen=True)
class OneOf:
    values: tuple

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.values

    def expects(self) -> str:
        return "one of " + ", ".join(self.values)


@dataclasses.dataclass(frozen=True)
class Registered:
    """A name of a registry, read when checked: extensions may register after import."""

    registry: Any

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.registry

    def expects(self) -> str:
        return (f"one of {', '.join(self.registry.names())} "
                f"(or register a new {self.registry.what})")


@dataclasses.dataclass(frozen=True)
class Text:
    nonempty: bool = False

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (bool(value) or not self.nonempty)

    def expects(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"


@dataclasses.dataclass(frozen=True)
class Path:
    kind: str  # "file" or "directory"

    def accepts(self, value) -> bool:
        if not isinstance(value, str):
            return False
        if not value or "://" in value:
            return True
        return os.path.isfile(value) if self.kind == "file" else os.path.isdir(value)

    def expects(self) -> str:
        return f"'' or the path of an existing {self.kind}"


@dataclasses.dataclass(frozen=True)
class Sequence:
    item: Any

    def accepts(self, value) -> bool:
        return isinstance(value, (tuple, list)) and all(self.item.accepts(v) for v in value)

    def expects(self) -> str:
        return f"a tuple whose items are each {self.item.expects()}"


@dataclasses.dataclass(frozen=True)
class Like:
    default: Any

    def accepts(self, value) -> bool:
        kind = type(self.default)
        if kind is float:
            return _is_number(value)
        if kind in (tuple, list):
            return isinstance(value, (tuple, list))
        if kind is int:
            return _is_integer(value)
        return isinstance(value, kind)

    def expects(self) -> str:
        names = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
                 tuple: "a tuple", list: "a tuple"}
        return names.get(type(self.default), f"a {type(self.default).__name__}")


@dataclasses.dataclass(frozen=True)
class Key:
    """A config key: its default, the rule its values obey, and how to fix a bad value
    when the rule alone does not say."""

    default: Any
    rule: Any
    hint: str = ""


def _bounds(low, high) -> str:
    """'in [0, 1]', '>= 1', '<= 9' or ''."""
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def rule_of(entry):
    """The rule of a section entry (a Key, or a plain default)."""
    return entry.rule if isinstance(entry, Key) else Like(entry)


def defaults(section: dict) -> ml_collections.ConfigDict:
    """The ConfigDict of a section's defaults (nested sections become nested ConfigDicts)."""
    return ml_collections.ConfigDict({
        key: defaults(entry) if isinstance(entry, dict) else
        (entry.default if isinstance(entry, Key) else entry)
        for key, entry in section.items()
    })


def defaults_with(section: dict, overrides: dict, what: str) -> ml_collections.ConfigDict:
    """`defaults(section)` with `overrides`; a key the section lacks is a UserError naming
    `what` ("tower_config: vit towers") and the valid keys."""
    config = defaults(section)
    for key in overrides:
        if key not in config:
            raise UserError(f"{what} have no key {key!r}; valid: {sorted(config)}")
    config.update(overrides)
    return config


def problem(entry, value) -> str | None:
    """'must be an integer >= 1' (and the hint) if `value` breaks the rule of `entry`, a
    section entry; else None."""
    if rule_of(entry).accepts(value):
        return None
    hint = entry.hint if isinstance(entry, Key) else ""
    return f"must be {rule_of(entry).expects()}" + (f"; {hint}" if hint else "")
