"""The arguments of loss scaling: defaults, float32's range, and one clear line per bad value.

Shared by `DynamicLossScaleOptimizer` and the binaries' flag checks, so that a
scale outside float32's normal range or below its floor is refused the same way
wherever it comes from.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

import numpy as np

# Scales are float32 variables: below the smallest normal float32 TensorFlow
# flushes them to 0 on CPU (the scale would read 0.0 and unscaling would
# divide by zero), above the largest they are inf.
FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # ~1.18e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)  # ~3.4e38
DEFAULT_INITIAL_SCALE = 2.0**15
DEFAULT_GROWTH_INTERVAL = 2000
DEFAULT_MIN_SCALE = 1.0
DEFAULT_MAX_SCALE = 2.0**24


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    kind = "a positive integer" if integer else "a positive finite number"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be {kind}; got {name}={value!r}.")


def check_scale(name: str, value: float) -> None:
    """Raises `ValueError` unless `value` is a positive number within float32's normal range.

    Args:
        name: The argument's name, for the message.
        value: The scale.

    Raises:
        ValueError: not a positive finite number, or outside
            `[FLOAT32_MIN_NORMAL, FLOAT32_MAX]`; the message names `name` and `value`.
    """
    _check_number(name, value)
    if not FLOAT32_MIN_NORMAL <= value <= FLOAT32_MAX:
        raise ValueError(
            f"`{name}` must lie within float32's normal range [{FLOAT32_MIN_NORMAL:.4g}, "
            f"{FLOAT32_MAX:.4g}] (smaller scales are flushed to 0 and larger ones are inf); "
            f"got {name}={value!r}."
        )


def default_scale_bounds(initial_scale: float, min_scale: Optional[float],
                         max_scale: Optional[float]) -> tuple[float, float]:
    """`(min_scale, max_scale)` with defaults filled in.

    The floor defaults to 1 and the ceiling to 2**24, widened to `initial_scale`
    when it lies outside them, so that every scale stock Keras accepts is accepted.

    Args:
        initial_scale: The starting scale.
        min_scale: The floor asked for, or None for the default.
        max_scale: The ceiling asked for, or None for the default.

    Returns:
        `(min_scale, max_scale)`.
    """
    if min_scale is None:
        min_scale = min(DEFAULT_MIN_SCALE, initial_scale)
    if max_scale is None:
        max_scale = max(DEFAULT_MAX_SCALE, initial_scale)
    return min_scale, max_scale


def validate_scale_args(
    initial_scale: float,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    min_scale: float,
    max_scale: float,
    hysteresis: int,
) -> None:
    """Checks every argument of the scale rule together.

    Args:
        initial_scale, growth_factor, backoff_factor, growth_interval, min_scale,
        max_scale, hysteresis: As for `DynamicLossScaleOptimizer`.

    Raises:
        ValueError: naming the first argument that is out of range, and its value.
    """
    for name, value in (("initial_scale", initial_scale), ("min_scale", min_scale),
                        ("max_scale", max_scale)):
        check_scale(name, value)
    for name, value in (("growth_factor", growth_factor), ("backoff_factor", backoff_factor)):
        _check_number(name, value)
    _check_number("growth_interval", growth_interval, integer=True)
    _check_number("hysteresis", hysteresis, integer=True)
    if growth_factor <= 1:
        raise ValueError(f"`growth_factor` must be > 1; got growth_factor={growth_factor!r}.")
    if backoff_factor >= 1:
        raise ValueError(
            f"`backoff_factor` must be in (0, 1); got backoff_factor={backoff_factor!r}."
        )
    if not min_scale <= initial_scale <= max_scale:
        raise ValueError(
            "Need min_scale <= initial_scale <= max_scale; got "
            f"min_scale={min_scale!r}, initial_scale={initial_scale!r}, max_scale={max_scale!r}."
        )


def one_of(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    """tfmp's argument `name` or its stock Keras spelling `alias`; both only if equal.

    Args:
        name, value: tfmp's argument and its value (None: not given).
        alias, alias_value: The stock Keras spelling and its value (None: not given).
        default: What neither given means.

    Returns:
        The value given, or `default`.

    Raises:
        ValueError: both given and different.
    """
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(
            f"`{name}` and `{alias}` (its stock Keras name) disagree: "
            f"{name}={value!r}, {alias}={alias_value!r}; give one of them."
        )
    for candidate in (value, alias_value):
        if candidate is not None:
            return candidate
    return default


@dataclasses.dataclass(frozen=True)
class ScaleRule:
    """How the loss scale moves: the checked arguments of a `DynamicLossScaleOptimizer`.

    Attributes:
        growth_factor: Multiplier (> 1) after `growth_interval` clean updates in a row.
        backoff_factor: Multiplier in (0, 1) on overflow, after `hysteresis` of them.
        growth_interval: Clean optimizer updates in a row before the scale grows.
        min_scale, max_scale: The scale never leaves `[min_scale, max_scale]`.
        hysteresis: Overflowing steps tolerated before backing off.
        dynamic: False: the scale never moves (a fixed scale, or the NaN guard's 1).
    """

    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = DEFAULT_GROWTH_INTERVAL
    min_scale: float = DEFAULT_MIN_SCALE
    max_scale: float = DEFAULT_MAX_SCALE
    hysteresis: int = 1
    dynamic: bool = True
