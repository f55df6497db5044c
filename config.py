"""Typed configuration: dataclasses, YAML presets, ``key=value`` overrides.

Each component owns a dataclass config. A run config nests them. YAML presets in
``configs/`` fill fields; the command line overrides any field by dotted path
(``model.fusion.name=gated``); the fully resolved config is written to every run
directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from clinfuse.errors import InputError, NotFoundError

T = TypeVar("T")


def parse_value(text: str) -> Any:
    """Parses an override value with YAML rules (``3`` int, ``1e-3`` float, ``[a, b]`` list)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with each ``dotted.key=value`` applied."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_value(text)
    return out


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Builds dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    data = data or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        where = path or cls.__name__
        raise InputError(
            f"unknown config key(s) {sorted(unknown)} in {where}; known: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{path}.{name}" if path else name)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain nested dicts and lists (YAML- and JSON-safe)."""
    return _plain(dataclasses.asdict(obj))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds.

    Raises:
        NotFoundError: no such file.
        InputError: the file is not YAML, or not a mapping at the top level.
    """
    if not Path(path).is_file():
        raise NotFoundError("no such config file", path, "check the --config path")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise InputError(f"not valid YAML ({err})", path, "fix the file") from err
    if not isinstance(data, dict):
        raise InputError("a config file must hold a mapping at the top level", path)
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def _dataclass_type(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
