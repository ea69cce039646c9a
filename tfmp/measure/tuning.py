"""`tfmp.tune`: pick the precision policy, and XLA or not, by measuring them on the user's model.

A rule can say what the hardware supports, not whether 16 bits pay for a given
model: on a CPU with bfloat16 instructions a wide transformer trains faster in
bfloat16 while a narrow MLP does not, and XLA (`jit_compile=True`) speeds up
float32 on some models and slows bfloat16 down on others. `tune` runs
`tfmp.compare_precision` (float32 against each candidate configuration, policy x
XLA, from identical weights on identical batches, taking turns step by step) and
picks the fastest candidate whose numerics pass, if it is faster than float32 by
at least `min_speedup`; otherwise float32 without XLA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import keras
import tensorflow as tf

from tfmp.distribute.strategies import xla_refusal
from tfmp.measure.comparison import (FAILED_ARM, XLA_SUFFIX, Comparison, compare_precision,
                                     parse_variant, weights_variant)
from tfmp.precision import HardwareInfo, detect_hardware
from tfmp.precision.policy import (FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16, parse_precision,
                                   trap_warnings)

DEFAULT_MIN_SPEEDUP = 1.05  # below this, the measured gain is within a noisy machine's drift
CANDIDATES = (MIXED_BFLOAT16, MIXED_FLOAT16)  # traps on the hardware at hand are skipped
# mixed_bfloat16 with bfloat16 weights: a default candidate where `auto` picks mixed_bfloat16
BF16_WEIGHTS = "bf16w"
XLA_ONLY = "only"  # tune(xla="only"): every candidate compiled by XLA (XLA is forced on anyway)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What `tune` chose, and the figures it chose on.

    Attributes:
        policy: The chosen policy (`float32` when no candidate paid).
        reason: One sentence with the figures.
        speedups: Median step-time speed-up over float32 of every candidate measured, by
            label (`mixed_bfloat16`, `float32+xla`, `mixed_bfloat16+xla`).
        passed: Whether each candidate's numerics passed against float32.
        skipped: Candidates not measured, with why: a trap on this hardware; `xla`: XLA
            cannot train under the strategy; `<policy>+xla`: XLA could not compile the step.
        comparison: The `Comparison` behind it (None when nothing was measured).
        jit_compile: Whether to compile the train step with XLA (the chosen candidate's).
        loss: The loss it measured with, and why (`Comparison.loss`; empty when nothing
            was measured).
        weights_dtype: The 16-bit dtype to store the weights in (`tfmp.prepare`'s
            `weights_dtype`) when the chosen candidate is `bf16w`, else None.
    """

    policy: str
    reason: str
    speedups: dict[str, float]
    passed: dict[str, bool]
    skipped: dict[str, str]
    comparison: Optional[Comparison]
    jit_compile: bool = False
    loss: str = ""
    weights_dtype: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """The choice and its figures, JSON-serializable (the full comparison omitted)."""
        return {"policy": self.policy, "jit_compile": self.jit_compile,
                "weights_dtype": self.weights_dtype,
                "reason": self.reason, "loss": self.loss, "speedups": self.speedups,
                "passed": self.passed, "skipped": self.skipped,
                "max_relative_loss_gap": {} if self.comparison is None else {
                    v.label: v.max_relative_loss_gap for v in self.comparison.verdicts}}


def choose(comparison: Optional[Comparison], skipped: dict[str, str],
           min_speedup: float = DEFAULT_MIN_SPEEDUP) -> TuneResult:
    """The decision alone: the fastest passing candidate at least `min_speedup` faster.

    Args:
        comparison: `compare_precision` with float32 first, then the candidates
            (labels are canonical policy names, `+xla` for XLA).
        skipped: Candidates not measured, and why.
        min_speedup: Median speed-up over float32 a candidate needs to be chosen.

    Returns:
        The `TuneResult`.
    """
    if comparison is None:
        return TuneResult(FLOAT32, "no candidate could be measured here ("
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
        reason = (f"measured on this model and batch: {figures} float32's speed; no candidate "
                  f"passed and reached {min_speedup:g}x, so float32")
    policy, jit = parse_variant(best)
    policy, weights = weights_variant(policy)
    return TuneResult(parse_precision(policy), reason, speedups, passed, dict(skipped),
                      comparison, jit, comparison.loss, weights)


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
    xla: Union[bool, str] = True,
    strategy: Optional[tf.distribute.Strategy] = None,
) -> TuneResult:
    """Times float32 and each candidate configuration on `build_model()` and picks one.

    The candidates are each 16-bit policy (and, where `auto` picks mixed_bfloat16,
    `bf16w`: mixed_bfloat16 with bfloat16 weights, `tfmp.prepare`'s `weights_dtype`),
    and with `xla` float32 and each policy
    with the train step compiled by XLA (`jit_compile=True`); the baseline is
    float32 without XLA. Candidates that are traps on this hardware (float16 on a
    CPU, where it is emulated) are not run, nor XLA where it cannot train under
    `strategy` (`skipped["xla"]`): they are listed in `skipped` with the reason. A
    candidate XLA cannot compile (an op without an XLA kernel) is dropped and the
    rest measured again; `skipped["<policy>+xla"]` says why.

    Args:
        build_model: Returns a new, built Sequential or Functional model.
        dataset: `(inputs, labels)` batches, at least `steps` of them: the user's own batch size.
        candidates: 16-bit policies to try, or `bf16w` (default: mixed_bfloat16,
            mixed_float16, and `bf16w` where the hardware has bfloat16: `auto` picks
            mixed_bfloat16 there).
        steps: Training steps per candidate (the first 2 are not timed).
        tolerance: Largest relative loss gap to float32 that passes (`compare_precision`).
        min_speedup: Median speed-up over float32 needed to choose a candidate.
        seed, loss, optimizer: As for `tfmp.compare_precision` (by default the model's
            compiled loss, else one matching its output: `TuneResult.loss` says which).
        hardware: The hardware to decide for; detected when omitted.
        xla: True: measure each candidate with and without XLA; False: without;
            `"only"`: with XLA only (training will compile with XLA whatever tune picks).
            XLA's compilation happens in the untimed warm-up steps.
        strategy: The strategy the chosen configuration will train under (XLA is not
            measured where it cannot run there: `tfmp.distribute.strategies.xla_refusal`).

    Returns:
        A `TuneResult`: `.policy`, `.jit_compile` and `.weights_dtype` to train with,
        `.reason` with the figures, `.loss` the loss they were measured with.

    Raises:
        ValueError: a bad candidate name (or `auto`), `min_speedup` not a positive
            number, `xla` not a bool, or what `compare_precision` rejects.

    Example:
    >>> choice = tfmp.tune(build, train_ds.take(30), steps=30)
    >>> print(choice.reason)
    >>> model, opt = tfmp.prepare(build(), "adam", choice.policy)
    >>> model.compile(opt, loss, jit_compile=choice.jit_compile)
    """
    if not (isinstance(min_speedup, (int, float)) and math.isfinite(min_speedup)
            and min_speedup > 0):
        raise ValueError(f"min_speedup={min_speedup!r} must be a positive number")
    if not (isinstance(xla, bool) or xla == XLA_ONLY):
        raise ValueError(f"xla={xla!r} must be True, False or {XLA_ONLY!r}")
    hw = hardware if hardware is not None else detect_hardware()
    default = CANDIDATES + ((BF16_WEIGHTS,) if hw.recommended_policy == MIXED_BFLOAT16 else ())
    names = [c.lower() if weights_variant(c)[1] else parse_precision(c)
             for c in (candidates or default)]
    if "auto" in names or FLOAT32 in names:
        raise ValueError(f"candidates={tuple(candidates or ())!r}: name 16-bit policies "
                         "(float32 is always the baseline; auto is what tune replaces)")
    skipped: dict[str, str] = {}
    measured = []
    for name in dict.fromkeys(names):
        traps = trap_warnings(weights_variant(name)[0], hw)
        if traps:
            skipped[name] = traps[0].split(":")[0]
        else:
            measured.append(name)
    refusal = xla_refusal(strategy) if xla else None
    if refusal:
        skipped["xla"] = f"XLA {refusal}"
    elif xla:
        compiled = [FLOAT32 + XLA_SUFFIX] + [name + XLA_SUFFIX for name in measured]
        measured = compiled if xla == XLA_ONLY else [
            compiled[0], *(v for name in measured for v in (name, name + XLA_SUFFIX))]
    while True:
        try:
            comparison = _measure(build_model, dataset, measured, steps=steps, seed=seed,
                                  loss=loss, optimizer=optimizer, tolerance=tolerance, hardware=hw)
            break
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            label = getattr(e, FAILED_ARM, "")  # XLA has no kernel for some op: drop that arm
            if not label.endswith(XLA_SUFFIX):
                raise
            skipped[label] = f"XLA could not compile this model's train step: {_xla_error(e)}"
            measured.remove(label)
    return choose(comparison, skipped, min_speedup)


def _measure(build_model: Callable[[], keras.Model], dataset: Any, labels: Sequence[str],
             **kwargs: Any) -> Optional[Comparison]:
    if not labels:
        return None
    return compare_precision(build_model, dataset, policies=(FLOAT32, *labels), **kwargs)


def _xla_error(error: Exception) -> str:
    """The line of a TensorFlow error that says what XLA could not compile (TensorFlow puts
    `Graph execution error:` and `Detected at node` lines first)."""
    lines = [line.strip() for line in str(getattr(error, "message", None) or error).splitlines()]
    for line in lines:
        if "unsupported operation" in line.lower() or "no registered" in line.lower():
            return line
    lines = [line for line in lines if line and not line.startswith(("Graph execution error",
                                                                     "Detected at node"))]
    return lines[0] if lines else type(error).__name__
