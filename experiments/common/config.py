"""Strict configuration: YAML mappings validated into frozen dataclasses.

An unknown or misspelt key, a missing required key, or a value of the wrong type is a `ConfigError` that names the
key (with its dotted path), the valid keys or choices, and what was received. Every number is checked where it
enters: a float must be finite (`.inf` and `.nan` are refused for every key), an integer must fit in 64 bits.
Range checks live in each dataclass's `__post_init__` (`check_seed` and `check_count` for seeds and iteration
counts); their `ValueError`s are re-raised as `ConfigError` with the key path.

    @dataclasses.dataclass(frozen=True)
    class Train:
        steps: int = 100
        loss: Literal["square", "cross_entropy"] = "square"

    cfg = from_dict(Train, load_yaml("configs/x.yaml"), overrides=["steps=200"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

from experiments.common.cli import UserError


class ConfigError(UserError, ValueError):
    """A configuration that does not validate; the message names the key."""


#: seeds lie in 0 .. SEED_MAX: there `jax.random.PRNGKey(seed)` is the same distinct key with and without 64-bit JAX
#: (above it, 32-bit JAX folds a seed onto a smaller one, e.g. 2**32 onto 0, and 2**63 overflows)
SEED_MAX = 2**32 - 1
#: iteration counts and sizes that enter a compiled program as integers: int32 without 64-bit JAX
COUNT_MAX = 2**31 - 1
_INT64 = 2**63


def check_seed(name: str, value: int) -> None:
    """A seed in 0 .. `SEED_MAX` (a `ValueError` naming `name` otherwise)."""
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name} must be an integer in 0 .. 2**32 - 1 (a seed of jax.random.PRNGKey); got {value!r}")


def check_count(name: str, value: int, *, minimum: int = 1) -> None:
    """An iteration count or size in `minimum` .. `COUNT_MAX` (it enters compiled programs as an int32)."""
    if not minimum <= value <= COUNT_MAX:
        raise ValueError(f"{name} must be an integer in {minimum} .. 2**31 - 1; got {value!r}")


def load_yaml(path: str | pathlib.Path) -> dict:
    """The mapping in a YAML file; a missing, unreadable or malformed file is a one-line `ConfigError`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open() as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {where} is not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level; got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.steps=200"` -> (["train", "steps"], 200); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value or section.key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise errors[0]  # a number for `float | None`: its own message ("expected a finite number") says more
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}; got {value!r}")
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{where}: {value!r} is not a valid choice{extra}; valid choices: " + ", ".join(repr(a) for a in args)
            )
        return value
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list; got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer; got {value!r}")
        if not -_INT64 <= value < _INT64:
            raise ConfigError(f"{where}: expected an integer that fits in 64 bits; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number; got {value!r}")
        number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number; got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string; got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r} in a config dataclass")


def from_dict(cls: type, data: Any, *, where: str = "", overrides: Sequence[str] = ()) -> Any:
    """Validate `data` (a mapping, plus `overrides` like `"train.steps=200"`) into the dataclass `cls`."""
    if overrides:
        data = apply_overrides(data or {}, overrides)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys to values; got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown key {name!r}{extra}; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {path!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(_at(where, str(err), fields)) from err


def _at(where: str, message: str, fields: Mapping) -> str:
    """A range check's message with the key's full path: "steps must ..." in section `grid` becomes
    "grid.steps must ..." (a message that starts with a field's name is about that field), else "grid: ..."."""
    head = re.match(r"[A-Za-z_]\w*", message)
    if head and head.group() in fields:
        return f"{where}.{message}" if where else message
    return f"{where}: {message}" if where else message


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain Python (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


__all__ = [
    "COUNT_MAX",
    "SEED_MAX",
    "ConfigError",
    "apply_overrides",
    "check_count",
    "check_seed",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "parse_override",
    "to_dict",
]
