"""What `LossScaleMonitor` says about 16-bit weights: updates lost to rounding, and the fix."""

from __future__ import annotations

from typing import Any, Optional

import keras

from tfmp.callbacks.counters import compensated
from tfmp.compensation.optimizer import is_half

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
    rounding = compensated(optimizer).rounding
    if rounding == "nearest":
        fix = ("compensate them: rounding='stochastic' or 'kahan' (tfmp.compensate(optimizer, "
               "rounding=...); tfmp.prepare(..., weights_dtype='bfloat16') compensates), or keep "
               "float32 weights (a mixed_* policy)")
    else:
        fix = ("use rounding='stochastic', which loses none in expectation, or keep float32 "
               "weights (a mixed_* policy)")
    return (f"tfmp: {share:.0%} of the updates of 16-bit weights were lost to rounding at step "
            f"{step} (rounding={rounding!r}): {fix}")


def uncompensated_half_weights(model: keras.Model) -> Optional[str]:
    """A warning when `model` trains 16-bit weights with an optimizer that loses their
    small updates (stock Keras under a `"bfloat16"` policy), else None."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or compensated(optimizer) is not None:
        return None
    half = [v for v in model.trainable_variables if is_half(v)]
    if not half:
        return None
    return (f"tfmp: {len(half)} trainable variable(s) are 16-bit (first: {half[0].path}) and "
            f"{type(optimizer).__name__} updates them in 16 bits: updates smaller than half a "
            "unit of a weight are lost. Use tfmp.compensate(optimizer) (or tfmp.prepare(..., "
            "weights_dtype='bfloat16')), or float32 weights (a mixed_* policy)")
