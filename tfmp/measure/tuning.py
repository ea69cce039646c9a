"""`tfmp.tune`: pick the precision policy by measuring it on the user's own model and batch.

A rule can say what the hardware supports, not whether 16 bits pay for a given
model: on a CPU with bfloat16 instructions a wide transformer trains faster in
bfloat16 while a narrow MLP does not. `tune` runs `tfmp.compare_precision`
(float32 against each candidate, from identical weights on identical batches,
the policies taking turns step by step) and picks the fastest candidate whose
numerics pass, if it is faster than float32 by at least `min_speedup`;
otherwise float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import keras

from tfmp.measure.comparison import Comparison, compare_precision
from tfmp.precision import (FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16, HardwareInfo, detect_hardware,
                            parse_precision, trap_warnings)

DEFAULT_MIN_SPEEDUP = 1.05  # below this, the measured gain is within a noisy machine's drift
CANDIDATES = (MIXED_BFLOAT16, MIXED_FLOAT16)  # traps on the hardware at hand are skipped


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What `tune` chose, and the figures it chose on.

    Attributes:
        policy: The chosen policy (`float32` when no candidate paid).
        reason: One sentence with the figures.
        speedups: Median step-time speed-up over float32 of every candidate measured.
        passed: Whether each candidate's numerics passed against float32.
        skipped: Candidates not measured, with why (a trap on this hardware).
        comparison: The `Comparison` behind it (None when nothing was measured).
    """

    policy: str
    reason: str
    speedups: dict[str, float]
    passed: dict[str, bool]
    skipped: dict[str, str]
    comparison: Optional[Comparison]

    def to_dict(self) -> dict[str, Any]:
        """The choice and its figures, JSON-serializable (the full comparison omitted)."""
        return {"policy": self.policy, "reason": self.reason, "speedups": self.speedups,
                "passed": self.passed, "skipped": self.skipped,
                "max_relative_loss_gap": {} if self.comparison is None else {
                    v.label: v.max_relative_loss_gap for v in self.comparison.verdicts}}


def choose(comparison: Optional[Comparison], skipped: dict[str, str],
           min_speedup: float = DEFAULT_MIN_SPEEDUP) -> TuneResult:
    """The decision alone: the fastest passing candidate at least `min_speedup` faster.

    Args:
        comparison: `compare_precision` with float32 first, then the candidates
            (labels are canonical policy names).
        skipped: Candidates not measured, and why.
        min_speedup: Median speed-up over float32 a candidate needs to be chosen.

    Returns:
        The `TuneResult`.
    """
    if comparison is None:
        return TuneResult(FLOAT32, "no 16-bit policy could be measured here ("
                          + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")",
                          {}, {}, dict(skipped), None)
    speedups = {v.label: v.throughput_ratio[1] for v in comparison.verdicts}
    passed = {v.label: v.passed for v in comparison.verdicts}
    figures = ", ".join(f"{k} {s:.2f}x{'' if passed[k] else ' (numerics failed)'}"
                        for k, s in speedups.items())
    fit = [k for k in speedups if passed[k] and math.isfinite(speedups[k])
           and speedups[k] >= min_speedup]
    if fit:
        best = max(fit, key=lambda k: speedups[k])
        reason = (f"measured on this model and batch: {figures} float32's speed; {best} is "
                  f"the fastest that passed")
    else:
        best = FLOAT32
        reason = (f"measured on this model and batch: {figures} float32's speed; no 16-bit "
                  f"policy passed and reached {min_speedup:g}x, so float32")
    return TuneResult(best, reason, speedups, passed, dict(skipped), comparison)


def tune(
    build_model: Callable[[], keras.Model],
    dataset: Any,
    *,
    candidates: Optional[Sequence[str]] = None,
    steps: int = 30,
    tolerance: float = 0.05,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    seed: int = 0,
    loss: Any = None,
    optimizer: Any = "adam",
    hardware: Optional[HardwareInfo] = None,
) -> TuneResult:
    """Times float32 and each candidate policy on `build_model()` and picks one.

    Candidates that are traps on this hardware (float16 on a CPU, where it is
    emulated) are not run: they are listed in `skipped` with the reason.

    Args:
        build_model: Returns a new, built Sequential or Functional model.
        dataset: `(inputs, labels)` batches, at least `steps` of them: the user's own batch size.
        candidates: 16-bit policies to try (default: mixed_bfloat16 and mixed_float16).
        steps: Training steps per policy (the first 2 are not timed).
        tolerance: Largest relative loss gap to float32 that passes (`compare_precision`).
        min_speedup: Median speed-up over float32 needed to choose a 16-bit policy.
        seed, loss, optimizer: As for `tfmp.compare_precision`.
        hardware: The hardware to decide for; detected when omitted.

    Returns:
        A `TuneResult`: `.policy` to train with, `.reason` with the figures.

    Raises:
        ValueError: a bad candidate name (or `auto`), `min_speedup` not a positive
            number, or what `compare_precision` rejects.

    Example:
    >>> choice = tfmp.tune(build, train_ds.take(30), steps=30)
    >>> print(choice.reason)
    >>> model, opt = tfmp.prepare(build(), "adam", choice.policy)
    """
    if not (isinstance(min_speedup, (int, float)) and math.isfinite(min_speedup)
            and min_speedup > 0):
        raise ValueError(f"min_speedup={min_speedup!r} must be a positive number")
    hw = hardware if hardware is not None else detect_hardware()
    names = [parse_precision(c) for c in (candidates or CANDIDATES)]
    if "auto" in names or FLOAT32 in names:
        raise ValueError(f"candidates={tuple(candidates or ())!r}: name 16-bit policies "
                         "(float32 is always the baseline; auto is what tune replaces)")
    skipped = {}
    measured = []
    for name in dict.fromkeys(names):
        traps = trap_warnings(name, hw)
        if traps:
            skipped[name] = traps[0].split(":")[0]
        else:
            measured.append(name)
    comparison = None
    if measured:
        comparison = compare_precision(build_model, dataset, policies=(FLOAT32, *measured),
                                       steps=steps, seed=seed, loss=loss, optimizer=optimizer,
                                       tolerance=tolerance, hardware=hw)
    return choose(comparison, skipped, min_speedup)
