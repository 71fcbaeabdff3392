"""YAML-backed dataclass configs with ``key=value`` command-line overrides (torchtune style).

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Cfg:
    ...     lr: float = 1e-3
    ...     steps: int = 10
    >>> load_config(Cfg, overrides=["lr=3e-4"]).lr
    0.0003
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hf_optim.core.errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: ``1e-6`` is a float, and only true/false are booleans (PyYAML's YAML 1.1
    turns ``mixed_precision=no`` and ``gradient_checkpointing=off`` into False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely, with YAML 1.2 floats (``3e-4`` is a number)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
_KIND = {int: "an integer", float: "a number", str: "a string"}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(cls: type, key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(names)}."
    return ConfigError(f"Unknown {cls.__name__} key {key!r}.{hint}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r} fits none of {annotation}: {'; '.join(errors)}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for option in allowed:
            if value == option or str(value).lower() == str(option).lower():
                return option
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}.")
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = load_yaml(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_type, key) for v in value]
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = load_yaml(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}.")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean (use true/false).")
    if annotation in (int, float, str):
        if isinstance(value, bool) and annotation is not str:
            raise ConfigError(f"{key}={value!r} must be {_KIND[annotation]}, not a boolean.")
        try:
            if annotation is int and isinstance(value, (str, float)):
                number = float(value)  # accepts "1e3" as well as "1000"
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be {_KIND[annotation]}.") from None
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a mapping, converting types and rejecting unknown keys."""
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_by_name:
            raise _unknown_key_error(cls, key)
        kwargs[key] = _coerce(value, types_by_name[key], key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["lr=3e-4", "model_config.hidden_size=64"]`` into a nested mapping of YAML-parsed values."""
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value.")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        value = load_yaml(raw) if raw != "" else ""
        target = result
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return result


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from an optional YAML file, then apply ``key=value`` overrides (dotted keys reach into dicts)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        loaded = load_yaml(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping at top level, got {type(loaded).__name__}.")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(cls, data)


def config_to_yaml(config: Any) -> str:
    """Serialize a config dataclass to YAML that :func:`load_config` reads back to an equal object."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
