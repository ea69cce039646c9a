"""Summaries of per-step measurements: quartiles of ratios taken side by side; how many
batches a measurement reads, for its progress line."""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """25%, 50% and 75% quantiles of the finite `values` (inclusive method).

    Args:
        values: Numbers; NaN and inf are left out.

    Returns:
        `(q1, median, q3)`; NaN three times if no value is finite.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (math.nan,) * 3
    if len(finite) == 1:
        return (finite[0],) * 3
    q1, q2, q3 = statistics.quantiles(finite, n=4, method="inclusive")
    return q1, q2, q3


def batches_phrase(data: Any, steps: Optional[int] = None) -> str:
    """How many batches of `data` a loop reads, in words, without reading any.

    Args:
        data: A `tf.data.Dataset` (its cardinality), a sized collection of batches, or
            any iterable.
        steps: The most batches read (None: all).

    Returns:
        `"4 batches"`, `"1 batch"`, `"up to 4 batches"` (a count not known beforehand) or
        `"every batch"`.
    """
    count = None
    if hasattr(data, "cardinality"):
        count = int(data.cardinality())
        count = count if count >= 0 else None  # infinite or unknown
    elif hasattr(data, "__len__"):
        count = len(data)
    if count is None and steps is None:
        return "every batch"
    n = steps if count is None else min(count, steps if steps is not None else count)
    return f"{'up to ' if count is None else ''}{n} batch{'' if n == 1 else 'es'}"
