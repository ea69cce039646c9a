"""What `LossScaleMonitor` says about 16-bit weights: updates lost to rounding, and the fix."""

from __future__ import annotations

from typing import Any, Optional

import keras

from tfmp import _compat
from tfmp.compensation.optimizer import compensated_part, is_half
from tfmp.rewrite.auditing import compensation_fix

DEFAULT_LOST_WARN = 0.1


def lost_updates_warning(optimizer: Any, share: float, step: int) -> str:
    """The warning for `share` lost updates at `step`, with a fix the run does not use.

    Args:
        optimizer: The model's optimizer (compensated, or wrapping a compensated one).
        share: The lost share at the last sample.
        step: The global step.

    Returns:
        One line.
    """
    inner = compensated_part(optimizer)
    rounding = inner.rounding
    float16 = any(keras.backend.standardize_dtype(v.dtype) == "float16"
                  for v in compensated_weights(inner))
    if rounding == "nearest":
        better = "rounding='kahan'" if float16 else "rounding='stochastic' or 'kahan'"
        fix = (f"compensate them: {better} (tfmp.compensate(optimizer, rounding=...); "
               f"tfmp.prepare(..., weights_dtype=...) compensates), or keep float32 weights "
               "(a mixed_* policy)")
    elif float16:  # stochastic rounding is bfloat16's: nothing better for float16 weights
        fix = "keep float32 weights (a mixed_* policy), or raise the learning rate"
    else:
        fix = ("use rounding='stochastic', which loses none in expectation, or keep float32 "
               "weights (a mixed_* policy)")
    return (f"tfmp: {share:.0%} of the updates of 16-bit weights were lost to rounding at step "
            f"{step} (rounding={rounding!r}): {fix}")


def compensated_weights(optimizer: Any) -> list:
    """The 16-bit variables a built compensated optimizer updates."""
    return [v for v in _compat.built_variables(optimizer) if is_half(v)] if optimizer.built else []


def uncompensated_half_weights(model: keras.Model) -> Optional[str]:
    """A warning when `model` trains 16-bit weights with an optimizer that loses their
    small updates (stock Keras under a `"bfloat16"` policy), else None."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or compensated_part(optimizer) is not None:
        return None
    half = [v for v in model.trainable_variables if is_half(v)]
    if not half:
        return None
    dtype = keras.backend.standardize_dtype(half[0].dtype)
    return (f"tfmp: {len(half)} trainable variable(s) are 16-bit (first: {half[0].path}) and "
            f"{type(optimizer).__name__} updates them in 16 bits: updates smaller than half a "
            f"unit of a weight are lost. Use {compensation_fix(dtype)}, or float32 weights (a "
            "mixed_* policy)")
