"""Typed configuration: plain dicts (from Hydra, JSON or code) into dataclasses, with clear errors.

Hydra stops at the entry points (``speech_ssl.cli``). Everything below takes the dataclasses built here,
so the rules for what a valid configuration is live in one place: the dataclass fields and their types.

* ``from_dict(cls, data)`` builds ``cls`` from a nested dict. An unknown key, a value of the wrong type,
  a value outside a ``Literal`` or a field's ``choices``, or a missing required value (``???`` or no
  default) raises :class:`ConfigError`, whose message names the full key and the valid choices.
* ``check_key(cls, "trainer.max_updates")`` validates a dotted key without a value (command-line
  overrides are checked this way before Hydra sees them).
* ``to_dict(obj)`` turns a dataclass back into plain JSON-ready data (saved beside every output).

A dataclass may name keys it no longer has in a class attribute ``__moved_keys__`` (``{"old": "new.key"}``,
the new key beside the class's own): the old key then fails with a ConfigError naming the new one.

A field can carry ``metadata={"choices": [...]}`` (or a zero-argument callable returning them) for
string fields whose valid values are known at run time, such as model preset names, and
``metadata={"min": 1}`` / ``{"max": ...}`` (inclusive bounds) for numbers: ``trainer.max_updates=-5`` then
fails where the dataclass is built, before anything runs, with the key and the valid range named.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

MISSING = "???"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed the configuration."""

    def __init__(self, key: str, problem: str, choices: typing.Iterable[Any] | None = None):
        self.key = key
        self.problem = problem
        self.choices = list(choices) if choices is not None else None
        super().__init__(self.paragraph())

    def __reduce__(self):  # raised on Ray workers too: pickles with its key, not just its message
        return (self.__class__, (self.key, self.problem, self.choices))

    def paragraph(self) -> str:
        text = f"Configuration error at '{self.key}': {self.problem}"
        if self.choices:
            shown = ", ".join(str(c) for c in self.choices[:40])
            more = f" (and {len(self.choices) - 40} more)" if len(self.choices) > 40 else ""
            text += f" Valid choices: {shown}{more}."
        return text


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_choices(field: dataclasses.Field) -> list[Any] | None:
    choices = field.metadata.get("choices") if field.metadata else None
    if callable(choices):
        choices = choices()
    return list(choices) if choices is not None else None


def _unknown_key(cls: type, key: str, full_key: str) -> ConfigError:
    moved = getattr(cls, "__moved_keys__", {}).get(key)
    if moved:  # a key that moved (``__moved_keys__``: old name -> new key, beside the class's own key)
        new_key = _join(".".join(full_key.split(".")[:-2]), moved)
        return ConfigError(full_key, f"no longer a key: this setting is {new_key} (one key per setting).")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(full_key, f"unknown key '{key}' in {cls.__name__}.{hint}", names)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, typing.Sequence):
        return "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, key: str, choices: list[Any] | None = None) -> Any:
    """Convert ``value`` to type ``tp``, raising ConfigError naming ``key`` when it does not fit."""
    if isinstance(value, str) and value == MISSING:
        raise ConfigError(key, "a required value is missing; give it on the command line as "
                               f"{key}=<value>.")
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, choices)
            except ConfigError as err:
                errors.append(err)
        # One non-null alternative: its own message is the most specific.
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(key, f"{value!r} is not allowed.", allowed)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}.",
                              [f.name for f in dataclasses.fields(tp)])
        return from_dict(tp, value, key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r} (write lists as [a,b]).")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}.")
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{key}[{i}]", choices) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}.")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): _convert(val_tp, v, _join(key, str(k))) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(key, f"{value!r} is not allowed.", [m.value for m in tp]) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
                return math.inf
            raise ConfigError(key, f"expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            else:
                raise ConfigError(key, f"expected a string, got {value!r}.")
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(key, f"{value!r} is not allowed.{hint}", choices)
        return value
    raise TypeError(f"config field {key} has unsupported type {tp!r}")


def range_text(field: dataclasses.Field) -> str | None:
    """The valid range of a numeric field (its ``min`` / ``max`` metadata) in words, or None without one."""
    low = field.metadata.get("min") if field.metadata else None
    high = field.metadata.get("max") if field.metadata else None
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f">= {low}"
    if high is not None:
        return f"<= {high}"
    return None


def _check_range(field: dataclasses.Field, value: Any, key: str) -> None:
    """A number outside the field's ``min``/``max`` metadata is a ConfigError naming the key and the range
    (the field's own type check has passed; ``None`` means "not set" and is always allowed)."""
    valid = range_text(field)
    if valid is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(key, f"{value!r} is out of range; valid values are {valid}.")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; errors name the dotted key under ``prefix``."""
    data = dict(data or {})
    hints = _hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = _join(prefix, field.name)
        if field.name in data:
            kwargs[field.name] = _convert(hints[field.name], data.pop(field.name), key, _field_choices(field))
            _check_range(field, kwargs[field.name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(key, f"a required value is missing; give it as {key}=<value>.")
    if data:
        raise _unknown_key(cls, sorted(data)[0], _join(prefix, sorted(data)[0]))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if prefix and not err.key.startswith(prefix):
            raise ConfigError(_join(prefix, err.key), err.problem, err.choices) from None
        raise


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain JSON-ready data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def check_key(cls: type, dotted: str) -> Any:
    """Check that ``dotted`` names a field of ``cls`` (or a key inside a free-form mapping field).

    Returns the field's type. Raises ConfigError naming the key and the valid choices otherwise.
    """
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        walked.append(part)
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp):
            names = {f.name: f for f in dataclasses.fields(tp)}
            if part not in names:
                raise _unknown_key(tp, part, ".".join(walked))
            tp = _hints(tp)[part]
        elif get_origin(tp) is dict or tp is dict:
            args = get_args(tp)
            tp = args[1] if args else Any
        elif tp is Any:
            return Any
        else:
            parent = ".".join(walked[:-1])
            raise ConfigError(".".join(walked), f"'{parent}' is {_type_name(tp)} and has no sub-keys.")
    return tp


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
