"""Checks for strategy settings: each returns the clean value or raises ConfigError naming it.

Settings come from config files (TOML/JSON), so a value of the wrong type is as likely as one
out of range; both are refused when the strategy is created, never at aggregation time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from common.errors import ConfigError


def _fail(method: str, name: str, must: str, value: Any) -> ConfigError:
    return ConfigError(f"{method}: setting {name!r} must be {must}, got {value!r}")


def int_setting(method: str, name: str, value: Any, *, minimum: int) -> int:
    """An integer (bools refused) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _fail(method, name, "an integer", value)
    if value < minimum:
        raise _fail(method, name, f">= {minimum}", value)
    return int(value)


def optional_int_setting(method: str, name: str, value: Any, *, minimum: int) -> int | None:
    return None if value is None else int_setting(method, name, value, minimum=minimum)


def float_setting(
    method: str,
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
) -> float:
    """A finite real number within the given bounds (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _fail(method, name, "a number", value)
    v = float(value)
    if not math.isfinite(v):
        raise _fail(method, name, "finite", value)
    if gt is not None and not v > gt:
        raise _fail(method, name, f"> {gt}", value)
    if ge is not None and not v >= ge:
        raise _fail(method, name, f">= {ge}", value)
    if lt is not None and not v < lt:
        raise _fail(method, name, f"< {lt}", value)
    return v


def fraction_setting(method: str, name: str, value: Any) -> float:
    """A decay rate in [0, 1) (Adam's betas, momentum)."""
    return float_setting(method, name, value, ge=0.0, lt=1.0)


def bool_setting(method: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise _fail(method, name, "true or false", value)
    return bool(value)


def optional_str_setting(method: str, name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _fail(method, name, "a string", value)
    return value
