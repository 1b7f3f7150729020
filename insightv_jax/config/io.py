"""YAML in and out: files with `include:`, `key=value` overrides, `load_config`, `save_yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from insightv_jax.config.base import ConfigError
from insightv_jax.config.coerce import from_dict, to_dict
from insightv_jax.config.run import RunConfig

T = TypeVar("T")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # an unclosed list, a !!python tag: one line, no traceback
            why = _yaml_problem(e)
            raise ConfigError(f"override {dotted}: {raw!r} is not valid YAML ({why})") from None
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line saying what is wrong, and where, in a YAML text."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem:
        return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else problem
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or malformed file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section."""
    out = _deep_copy(base)
    for k, v in top.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def read_with_includes(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """A YAML config whose optional `include:` lists files (relative to it) that
    it extends: included files first, this file's keys on top."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle")
    data = read_yaml(path)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, read_with_includes(path.parent / inc, (*_seen, path)))
    return deep_merge(merged, data)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: type[T] = RunConfig,
) -> T:
    """Load `cls` from a YAML file (optional) plus `key=value` overrides, validated."""
    data = read_with_includes(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the `config.yaml` of checkpoints and runs)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
