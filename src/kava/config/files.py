"""Building a :class:`~kava.config.KavaConfig`: defaults, then a YAML file (with ``base:``
chains), then ``key=value`` overrides; every value converted to its field's type, every
problem one line naming the file, line or field."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..io import safe_load_yaml, yaml_problem
from .fields import ConfigError, _check
from .schema import KavaConfig


def _convert(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, name)
    if tp is bool:
        _check(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), name, f"expected a number, got {value!r}"
        )
        _check(math.isfinite(value), name, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(
            isinstance(value, (str, int, float)) and not isinstance(value, bool),
            name,
            f"expected a string, got {value!r}",
        )
        _check("\0" not in str(value), name, f"{value!r} holds a NUL character (no path or name may)")
        return str(value)
    if origin is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        _check(isinstance(value, list), name, f"expected a list of mappings, got {value!r}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, typing.get_args(tp)[0], f"{name}[{i}]"))
            except ConfigError as e:  # a section's own checks say "name[]": name the entry
                raise ConfigError(str(e).replace(f"'{name}[].", f"'{name}[{i}].")) from None
        return out
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, list), name, f"expected a list, got {value!r}")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        _check(
            key in names,
            f"{prefix}{'.' if prefix else ''}{key}",
            f"unknown key; {cls.__name__} has {', '.join(sorted(names))}",
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{'.' if prefix else ''}{key}"
        kwargs[key] = _convert(value, hints[key], name)
    return cls(**kwargs)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


MAX_YAML_BYTES = 1 << 20  # a config file larger than 1 MiB is refused
MAX_BASE_DEPTH = 32  # base: chains deeper than this are refused


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """``["train.lr=1e-3", "latent.scheme=sequential"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    given: dict[tuple[str, ...], str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        if not key.strip().isprintable():
            raise ConfigError(f"override {item!r}: the key holds a control character")
        for prior_key, prior in given.items():  # the same key twice, or a section and a key inside it
            n = min(len(prior_key), len(parts))
            if tuple(parts[:n]) == prior_key[:n]:
                raise ConfigError(f"override {item!r}: {key.strip()} is also set by {prior!r}; give each key once")
        given[tuple(parts)] = item
        try:
            value = safe_load_yaml(raw) if raw.strip() != "" else ""
        except (yaml.YAMLError, RecursionError) as e:
            problem = yaml_problem(e) if isinstance(e, yaml.YAMLError) else "nested too deeply"
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping from ``path``, merged over the file its ``base:`` key names (relative to
    ``path``'s folder). Bad YAML, a duplicate key, a ``base:`` that is not a file name or that
    leads back to a file already read raise :class:`ConfigError` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist"
        if path.exists():
            what = "is a folder, not a file" if path.is_dir() else "is not a regular file"
        via = f" (the 'base' of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file {path}{via} {what}")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: 'base' chain deeper than {MAX_BASE_DEPTH} files (from {_chain[0]})")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config file is at most {MAX_YAML_BYTES:,}")
        data = safe_load_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: 'base' must name a YAML file (relative to this one), got {base!r}")
        here = path.resolve()
        parent_path = (path.parent / base).resolve()
        chain = (*_chain, here)
        if parent_path in chain:
            loop = " -> ".join(str(p) for p in (*chain, parent_path))
            raise ConfigError(f"{path}: 'base' goes round in a loop: {loop}")
        parent = read_yaml(parent_path, chain)
        data = deep_merge(parent, data)
    return data


def config_from_dict(data: dict) -> KavaConfig:
    return _from_dict(KavaConfig, data)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> KavaConfig:
    """Defaults, then the YAML file (which may name a ``base:`` file), then overrides."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def help_lines(cls: type = KavaConfig, prefix: str = "") -> list[str]:
    """One ``key (default): help`` line per field, for ``kava config``."""
    lines = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines.extend(help_lines(type(default), name + "."))
            continue
        lines.append(f"{name} ({default!r}): {f.metadata.get('help', '')}")
        item = typing.get_args(typing.get_type_hints(cls)[f.name])
        if item and dataclasses.is_dataclass(item[0]):  # a list of sections: describe one entry
            lines.extend(help_lines(item[0], name + "[]."))
    return lines
