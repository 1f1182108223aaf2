"""Typed configuration: dataclasses loaded from YAML plus `key.sub=value` overrides.

Every config is a dataclass whose fields carry a docstring-like `help` in their metadata.
Loading is strict: unknown keys are rejected with the nearest valid name, values are
checked against their declared types, and each dataclass may validate ranges in
`__post_init__` by raising ConfigError. Errors are one line a user can act on.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class UsageError(Exception):
    """Input the user must fix beyond the config (a command-line argument, a path, a run directory in the wrong
    state); the command line prints it as one line, exit status 2."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached (shown by `selfalign config --help`)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError('key: message') unless condition holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false as False: map back to the spelled choice
            spelled = [a for a in allowed if isinstance(a, str) and a.lower() in (
                ("yes", "on", "true") if value else ("no", "off", "false"))]
            value = spelled[0] if spelled else value
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the nearest valid name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints or key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"missing required config key '{prefix}{missing[0] if missing else '?'}'") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML dumps and diffs)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.beta=0.1' -> (['train', 'beta'], 0.1); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override applied."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when path is None), then apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return from_dict(cls, apply_overrides(data, overrides))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two config dicts."""
    rows = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            rows += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            rows.append((f"{prefix}{key}", a, b))
    return rows


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def fill_missing_keys(old: dict[str, Any], cfg: Any, legacy: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Give a saved config the keys it lacks (it was written before they existed); returns their dotted names.

    A missing key stands for what the version that wrote `old` did: legacy[key] where the key's
    default does not reproduce that, else the default. Where cfg holds the default and legacy[key]
    differs, cfg takes legacy[key] too, so a run resumed with its old command goes on as it began;
    any other value of cfg's is a real difference, left for the comparison to refuse.
    """
    filled = []
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            section = old.setdefault(f.name, {})
            if isinstance(section, dict):
                filled += fill_missing_keys(section, value, legacy, f"{key}.")
            continue
        if f.name in old or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            continue
        default = _default(f)
        old[f.name] = legacy.get(key, default)
        if value == default:
            setattr(cfg, f.name, old[f.name])
        filled.append(key)
    return filled


def adopt_old_defaults(old: dict[str, Any], cfg: Any, old_defaults: Mapping[str, Any]) -> list[str]:
    """Keys whose default changed since `old` was written: where old holds the former default and cfg the
    current one, cfg takes the former (the run goes on as it began, as fill_missing_keys does for a key an
    older version did not write). old_defaults: dotted key -> the former default. Returns the keys adopted."""
    adopted = []
    for key, was in old_defaults.items():
        *path, name = key.split(".")
        section, owner = old, cfg
        for part in path:
            section, owner = section.get(part) if isinstance(section, dict) else None, getattr(owner, part)
        field = next(f for f in dataclasses.fields(owner) if f.name == name)
        if isinstance(section, dict) and section.get(name) == was and getattr(owner, name) == _default(field) != was:
            setattr(owner, name, was)
            adopted.append(key)
    return adopted


def check_same_config(saved: Path, cfg: Any, legacy: Mapping[str, Any] | None = None,
                      old_defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Refuse (ConfigError) to resume a run whose saved config.yaml differs from cfg, showing the difference.

    Keys the saved config lacks are filled first (fill_missing_keys; legacy: the values that
    reproduce older versions where a key's default does not), and keys whose default changed take the
    saved value where it is the old default (adopt_old_defaults). Returns the keys filled or adopted.
    """
    if not saved.exists():
        return []
    old = yaml.safe_load(saved.read_text())
    filled = fill_missing_keys(old, cfg, legacy or {}) if isinstance(old, dict) else []
    if isinstance(old, dict):
        filled += adopt_old_defaults(old, cfg, old_defaults or {})
    new = to_dict(cfg)
    if old != new:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff(old, new))
        raise ConfigError(f"{saved} was made with a different config ({diff}); re-run with the same settings "
                          "or choose another output_dir")
    return filled


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every field, nested dataclasses flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows
