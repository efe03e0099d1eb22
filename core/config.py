"""One dataclass config per thing: to and from plain dicts, YAML/JSON files, saved with every run.

The command line that fills one is core/cli.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from core.atomic import write_text
from core.errors import ConfigError, first_line

T = TypeVar("T")


def to_dict(cfg) -> dict:
    """A plain, JSON/YAML-safe dict of a (nested) dataclass."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Path):
            v = str(v)
        out[f.name] = v
    return out


def flat_dict(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted.key: value}, the way the command line names its flags."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_dict(cls: type[T], d: dict, where: str = "config") -> T:
    """Build `cls` from a dict, recursing into nested dataclasses; unknown keys are an error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        kwargs[f.name] = coerce(hints[f.name], d[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(a, v, where) for a, v in zip(args, value))
        inner = args[0] if args else str
        seq = [coerce(inner, v, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {value!r} is not a boolean")
    if tp in (int, float):
        try:
            number = float(value)
            if tp is int and not number.is_integer():
                raise ValueError
            return int(number) if tp is int else number
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a number ({tp.__name__})") from None
    if tp is str:
        return str(value)
    if tp is Any:
        return value
    return value


def load_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON ({first_line(e)})") from None
    return d or {}


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config atomically, as YAML (.yaml/.yml) or JSON."""
    path = Path(path)
    d = to_dict(cfg)
    text = yaml.safe_dump(d, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(d, indent=2) + "\n"
    write_text(path, text)


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    return from_dict(cls, load_file(path), where=str(path))


def absolute_paths(cfg, names: Iterable[str]):
    """The config with its non-empty path fields resolved, so a saved config works from any folder."""
    return dataclasses.replace(cfg, **{n: str(Path(getattr(cfg, n)).resolve()) for n in names if getattr(cfg, n)})
