"""Summaries of per-step measurements: quartiles of ratios taken side by side."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


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
