"""Typed configuration: frozen dataclasses hold every default, YAML files and ``key=value`` overrides
merge on top, and anything unknown or mistyped is an error that names the key.

Precedence (lowest to highest): dataclass defaults < ``--config file.yaml`` < ``key=value`` arguments.
Nested sections are addressed with dots (``sampler.eta=0.9``). A section may also be given as the path
of a YAML file holding it (``policy: policy/tiny.yaml`` in a file, relative to that file; ``policy=path``
on the command line, relative to the working directory), so presets can share sections; such a file
replaces the whole section (its keys over the section's class defaults). Supported field types: ``bool``, ``int``,
``float``, ``str``, ``Literal[...]`` (the choices are listed in errors), ``X | None``, ``tuple[X, ...]``
and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key and what was expected."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a section with keys {', '.join(_field_types(tp))}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _unknown_key(key: str, cls: type, where: str) -> ConfigError:
    valid = list(_field_types(cls))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else "the top level"
    return ConfigError(
        f"unknown config key '{key}'{where}{hint}; valid keys in {section}: {', '.join(valid)}"
    )


def _coerce(value: Any, tp: Any, key: str, from_text: bool) -> Any:
    """Convert ``value`` (a YAML object, or a raw string from the command line when ``from_text``)
    to type ``tp``, or raise ConfigError naming ``key``."""

    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: is a section; set its keys ({', '.join(_field_types(tp))}) "
                f"as {key}.<name>=<value> or as a YAML mapping, got {value!r}"
            )
        return _build(tp, value, key + ".", "")
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice or (from_text and str(value) == str(choice)):
                return choice
        raise fail()
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_text and str(value).lower() in _NULL)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, from_text)
            except ConfigError:
                pass
        raise fail()
    if origin is tuple:
        items = yaml.safe_load(value) if from_text and isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", False) for i, v in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(items)}: {items!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", False) for i, (v, a) in enumerate(zip(items, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail()
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string; accept numeric strings
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise fail()
        if not math.isfinite(number):  # nan or inf would pass every range check and fail minutes later
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise ConfigError(f"{key}: unsupported field type {tp!r} in the config schema")


def _build(cls: type[T], data: dict, prefix: str, where: str, base: T | None = None, base_dir: Path | None = None) -> T:
    """Instantiate ``cls`` from a mapping, starting from ``base`` (or the defaults). String values of
    section fields are YAML files holding the section, relative to ``base_dir``."""
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in types_:
            raise _unknown_key(key, cls, where)
        tp = types_[name]
        current = getattr(base, name) if base is not None else None
        section_dir, section_where = base_dir, where
        if dataclasses.is_dataclass(tp) and isinstance(value, str):  # the file replaces the whole section
            value, section_dir, section_where = _read_yaml(Path(base_dir or ".") / value, key)
            current = None
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = _build(tp, value, key + ".", section_where, current, section_dir)
        else:
            kwargs[name] = _coerce(value, tp, key, from_text=False)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}{where}: {exc}") from exc


def _read_yaml(path: Path, key: str = "") -> tuple[dict, Path, str]:
    """A YAML mapping, the folder it is in (for the paths it names) and ' in <path>' for messages."""
    named = f" (named by '{key}', a section: set {key}.<name>=<value> or name a YAML file of it)" if key else ""
    if not path.is_file():
        raise ConfigError(f"config file {path}{named} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}{named}: expected a mapping of config keys at the top level")
    return data, path.parent, f" in {path}"


_SECTION_FILE = "\0file"  # tree key: a section given as a YAML file on the command line


def _apply_tree(cfg: T, tree: dict, prefix: str) -> T:
    """Apply a tree of raw command-line values to ``cfg``: each section's changes at once, so that
    checks across fields see all of them whatever their order on the command line."""
    types_ = _field_types(type(cfg))
    changes: dict[str, Any] = {}
    for name, value in tree.items():
        key = prefix + name
        if name not in types_:
            raise _unknown_key(key, type(cfg), " on the command line")
        tp = types_[name]
        if not dataclasses.is_dataclass(tp):
            if isinstance(value, dict):
                raise ConfigError(f"{key}: is not a section (it is {_describe(tp)}); cannot set '{key}.{next(iter(value))}'")
            changes[name] = _coerce(value, tp, key, from_text=True)
            continue
        if isinstance(value, str):
            value = {_SECTION_FILE: value}
        section = getattr(cfg, name)
        if _SECTION_FILE in value:  # the file first, then any keys set inside the section
            data, section_dir, where = _read_yaml(Path(value[_SECTION_FILE]), key)
            section = _build(tp, data, key + ".", where, None, section_dir)
        rest = {k: v for k, v in value.items() if k != _SECTION_FILE}
        changes[name] = _apply_tree(section, rest, key + ".") if rest else section
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ check of the section
        raise ConfigError(f"{prefix.rstrip('.') or type(cfg).__name__} (with the command-line overrides): {exc}") from exc


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Apply ``key=value`` strings (dotted keys for nested sections; a section's own key takes the path
    of a YAML file holding it, applied before any keys set inside that section). Later values of the same
    key win; the order of different keys does not matter."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        *sections, leaf = key.split(".")
        node = tree
        for part in sections:
            child = node.get(part)
            node[part] = {_SECTION_FILE: child} if isinstance(child, str) else (child or {})
            node = node[part]
        if isinstance(node.get(leaf), dict):  # keys of this section were set too: the file goes under them
            node[leaf][_SECTION_FILE] = raw.strip()
        else:
            node[leaf] = raw.strip()
    return _apply_tree(cfg, tree, "")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path`` (if any), then the ``key=value`` overrides."""
    cfg = cls()
    if path is not None:
        data, base_dir, where = _read_yaml(Path(path))
        cfg = _build(cls, data, "", where, base=cfg, base_dir=base_dir)
    return apply_overrides(cfg, overrides)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config; ``load_config(type(cfg), path)`` gives back an equal config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    Path(path).write_text(f"# resolved {type(cfg).__name__}: every key, after file and command-line overrides\n{text}")
