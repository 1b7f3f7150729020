"""What every configuration section shares: the error type and small checks."""

from __future__ import annotations

from typing import Any

from insightv_jax.errors import InsightVError


class ConfigError(InsightVError, ValueError):
    """A configuration problem; the message is one line and names the key."""


DTYPES = ("float32", "bfloat16", "float16")


def check_positive(section: Any, name: str, *keys: str) -> None:
    """A ConfigError naming the first of `keys` that is below 1: a zero head count
    or width would otherwise end in a ZeroDivisionError deep in model code."""
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"{name}.{key}={getattr(section, key)} must be >= 1")
