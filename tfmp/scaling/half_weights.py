"""`weights_dtype=`: which 16-bit weights a policy allows, and the optimizer that trains them.

`tfmp.wrap_optimizer(..., weights_dtype=...)` and `tfmp.prepare(..., weights_dtype=...)`
check the value here and make the optimizer keep the small updates of 16-bit weights
(`tfmp.compensate`): by stochastic rounding for bfloat16, with a Kahan buffer for
float16 (stochastic rounding rounds to bfloat16 only).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import keras
import tensorflow as tf

from tfmp import _compat

from tfmp.compensation import compensate
from tfmp.compensation.optimizer import DEFAULT_ROUNDING, compensated_part
from tfmp.precision.ranges import HALF_DTYPES

SEVERAL_WORKERS = (
    "TensorFlow's MultiWorkerMirroredStrategy cannot create bfloat16 variables (it broadcasts "
    "a variable's initial value with CollectiveBcastSend/Recv, which take no bfloat16): keep "
    "float32 weights on several workers, or train bfloat16 weights on one machine")
ACCEPTED = ("None (float32 weights), 'bfloat16' (under mixed_bfloat16) or 'float16' "
            "(under mixed_float16)")


def checked_weights_dtype(weights_dtype: Any, policy: str) -> Optional[str]:
    """`weights_dtype` if the policy computes in it, None for None.

    Args:
        weights_dtype: None, `"bfloat16"` or `"float16"`.
        policy: The canonical policy name (`mixed_bfloat16`, `mixed_float16`, `float32`).

    Returns:
        The 16-bit dtype to store the weights in, or None (float32 weights).

    Raises:
        ValueError: not one of those; a dtype the policy does not compute in (float32
            included), in one line naming the value and what is accepted; bfloat16 under
            a MultiWorkerMirroredStrategy over several workers (`SEVERAL_WORKERS`).
    """
    if weights_dtype is None:
        return None
    if weights_dtype == "bfloat16" and _compat.in_multi_worker_mode(tf.distribute.get_strategy()):
        raise ValueError(f"weights_dtype='bfloat16' on several workers: {SEVERAL_WORKERS}")
    if not isinstance(weights_dtype, str) or weights_dtype not in HALF_DTYPES:
        raise ValueError(f"weights_dtype={weights_dtype!r} is not accepted; use {ACCEPTED}")
    compute = keras.dtype_policies.get(policy).compute_dtype
    if compute != weights_dtype:
        raise ValueError(f"weights_dtype={weights_dtype!r} does not fit the policy {policy} (it "
                         f"computes in {compute}); use {ACCEPTED}")
    return weights_dtype


def rounding_for(weights_dtype: str) -> str:
    """The compensation for `weights_dtype`: the default rounding for bfloat16, `"kahan"` for
    float16 (stochastic rounding rounds to bfloat16 only)."""
    return "kahan" if weights_dtype == "float16" else DEFAULT_ROUNDING


def class_restorer(optimizer: Any) -> Callable[[], None]:
    """What gives `optimizer` (its inner one, under loss scaling) its class back, if
    `compensated_for` changes it and a later check refuses the call."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    kept = type(inner)

    def undo() -> None:
        inner.__class__ = kept

    return undo


def compensated_for(optimizer: Any, weights_dtype: str) -> Any:
    """`optimizer` made to keep the small updates of `weights_dtype` weights (its inner one
    if it is a loss-scale optimizer), in place; one compensated already is kept.

    Raises:
        ValueError: a compensated optimizer whose rounding loses updates (`"nearest"`) or
            cannot round to `weights_dtype`; what `tfmp.compensate` refuses.
    """
    inner = compensated_part(optimizer)
    if inner is None:
        return compensate(optimizer, rounding=rounding_for(weights_dtype))
    if inner.rounding == "nearest" or (weights_dtype == "float16"
                                       and inner.rounding == "stochastic"):
        raise ValueError(f"weights_dtype={weights_dtype!r}: {type(inner).__name__} has "
                         f"rounding={inner.rounding!r}; use rounding={rounding_for(weights_dtype)!r} "
                         "(or pass the optimizer uncompensated)")
    return optimizer
