"""Writing a float32 value into a 16-bit weight without losing small updates (`keras.ops`).

Three ways to round `w + u` (the weight plus its update, in float32) back to the
weight's 16-bit dtype:

- `nearest`: what Keras does. An update smaller than half a unit in the last place
  of the weight leaves it unchanged: it is lost.
- `kahan_add`: compensated summation. A 16-bit buffer `c` per weight carries what
  rounding dropped into the next step (optimi's Kahan summation).
- `stochastic_round` (bfloat16 only): rounds up with probability equal to the
  fraction of a unit dropped, so the weight is right in expectation (torchao's
  `bf16_stochastic_round`, llm.c).

`lost_counts` says how many nonzero updates each one lost on a step.
"""

from __future__ import annotations

from typing import Any, Optional

from keras import ops

# The low 16 bits of a float32 are what bfloat16 drops.
_HIGH_HALF = -65536  # 0xFFFF0000 as an int32
RANDOM_BITS = 16


SPLITS = 3  # roundings one 32-bit draw serves


def split_bits(draw: Any, which: int) -> Any:
    """The `which`-th (0, 1 or 2) set of 16 random bits in a draw of 32 per element.

    0: the low half; 1: the high half; 2: the low half XOR the high half rotated by 3.
    Each set is uniform in [0, 2**16), and any two are independent (the XOR of one half
    with an independent uniform half), so one draw rounds a weight and its two moments.

    Args:
        draw: int32 tensor, uniform over all bit patterns (`tf_ops.random_bits`).
        which: 0, 1 or 2.

    Returns:
        An int32 tensor of `draw`'s shape, values in [0, 2**16).
    """
    low = ops.bitwise_and(draw, 0xFFFF)
    if which == 0:
        return low
    high = ops.bitwise_and(ops.right_shift(draw, RANDOM_BITS), 0xFFFF)
    if which == 1:
        return high
    rotated = ops.bitwise_and(ops.bitwise_or(ops.right_shift(high, 3), ops.left_shift(high, 13)),
                              0xFFFF)
    return ops.bitwise_xor(low, rotated)


def nearest(value: Any, dtype: str) -> Any:
    """`value` rounded to the nearest `dtype` (the cast Keras' optimizers do)."""
    return ops.cast(value, dtype)


def stochastic_round(value: Any, bits: Any) -> Any:
    """Rounds float32 `value` to bfloat16, up or down at random, unbiased.

    Adds `bits` (uniform integers in [0, 2**16)) to the float32's low 16 bits and
    clears them: the magnitude is rounded away from zero with probability equal to
    the fraction of a bfloat16 unit those bits held. A carry past bfloat16's largest
    value rounds to nearest instead (so what nearest rounding keeps finite stays finite;
    a value beyond bfloat16's range becomes inf, as any cast makes it); inf stays inf, and
    a quiet NaN (what arithmetic makes: its top mantissa bit set) stays NaN.

    Args:
        value: A float32 tensor.
        bits: int32 tensor of `value`'s shape, uniform in [0, 2**16).

    Returns:
        A bfloat16 tensor.
    """
    value = ops.cast(value, "float32")
    raised = ops.bitwise_and(ops.add(ops.view(value, "int32"), bits), _HIGH_HALF)
    rounded = ops.view(raised, "float32")
    # Only a carry can make inf: from a finite value (then round it to nearest) or from inf
    # itself (inf again). NaN stays NaN (the high half of its mantissa is not zero).
    rounded = ops.where(ops.isinf(rounded), value, rounded)
    return ops.cast(rounded, "bfloat16")


def kahan_add(weight: Any, compensation: Any, update: Any,
              dtype: Optional[str] = None) -> tuple[Any, Any]:
    """`weight + update` in `weight`'s dtype, what rounding drops carried in `compensation`.

    In float32: `y = update + c`, `s = w + y`, `w' = round(s)`, `c' = round(y - (w' - w))`.

    Args:
        weight: The 16-bit weight, or its value already cast to float32 (then give `dtype`).
        compensation: Its buffer (same shape; 16-bit, or already cast to float32).
        update: The float32 update to add.
        dtype: The weight's 16-bit dtype (default: `weight`'s).

    Returns:
        `(new_weight, new_compensation)`, both in that dtype.
    """
    dtype = dtype or weight.dtype
    w = ops.cast(weight, "float32")  # no op when given in float32
    y = ops.add(ops.cast(update, "float32"), ops.cast(compensation, "float32"))
    new = ops.cast(ops.add(w, y), dtype)
    carried = ops.subtract(y, ops.subtract(ops.cast(new, "float32"), w))
    return new, ops.cast(carried, dtype)


def lost_counts(update: Any, before: Any, after: Any, rounding: str,
                compensation: Optional[tuple[Any, Any]] = None) -> tuple[Any, Any]:
    """How many updates a 16-bit write lost that a float32 weight would have kept.

    Counted: the updates that change the weight in float32 (`w + u != w`; an update
    below float32's own precision is lost with float32 weights too). Lost: those that
    nothing kept: under `nearest` the weight did not move; under `kahan` neither the
    weight nor its buffer moved. Stochastic rounding keeps every one of them in
    expectation (its random bits reach float32's last bit), so it loses none: it is
    not measured (`rounding="stochastic"` gives 0 lost).

    Args:
        update: The float32 update.
        before: The weight before, in float32.
        after: The weight after (16 bits).
        rounding: `"nearest"`, `"kahan"` or `"stochastic"`.
        compensation: `(before, after)` of the Kahan buffer (float32), under `kahan`.

    Returns:
        `(lost, counted)`, float32 scalars.
    """
    counted = ops.not_equal(ops.add(before, update), before)
    if rounding == "stochastic":
        kept = counted
    else:
        kept = ops.not_equal(ops.cast(after, "float32"), before)
        if compensation is not None:
            kept = ops.logical_or(kept, ops.not_equal(*compensation))
    lost = ops.logical_and(counted, ops.logical_not(kept))
    return (ops.sum(ops.cast(lost, "float32")), ops.sum(ops.cast(counted, "float32")))
