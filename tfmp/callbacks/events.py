"""A non-finite event that needs attention, its diagnosis, and the error `on_nan="raise"` raises."""

from __future__ import annotations

import dataclasses
from typing import Optional

# What an event is, once the bad batch has been run again (`diagnose`).
PRECISION = "precision"    # finite in float32 with the same weights, not in 16 bits
DIVERGENCE = "divergence"  # non-finite in float32 too: the weights, the model's own code
DATA = "data"              # the batch itself holds inf/NaN
UNVERIFIED = "unverified"  # no batch was kept, or it ran finite again: not checked
KINDS = (PRECISION, DIVERGENCE, DATA, UNVERIFIED)
# What happened on the step (`NanMonitor`).
NONFINITE_LOSS = "nonfinite_loss"
SCALE_AT_MINIMUM = "scale_at_minimum"


@dataclasses.dataclass(frozen=True)
class NanEvent:
    """A non-finite event that needs attention, with its diagnosis.

    Attributes:
        kind: What the bad batch, run again, showed the cause to be: `"precision"` (finite
            in float32 with the same weights: the 16-bit range), `"divergence"` (non-finite
            in float32 too: the updates, not the precision), `"data"` (the batch itself
            holds inf/NaN) or `"unverified"` (no batch was kept: no
            `tfmp.DynamicLossScaleOptimizer`, as under `tfmp.prepare`'s default
            `guard=False` in bfloat16 or float32, or XLA, or a TPU; or it ran finite again).
        trigger: What happened: `"nonfinite_loss"` (the unscaled loss was NaN/inf) or
            `"scale_at_minimum"` (gradients overflowed with the loss scale pinned at its
            floor for `patience` steps). Overflows that loss scaling recovers from are
            counted, not reported as events.
        epoch, batch, step: Where it happened (the step counted over the whole run).
        loss: The batch's loss (None if the logs had none).
        loss_scale: The scale after the step.
        skipped_steps: Steps skipped so far.
        first_nonfinite_variable: The first variable whose gradient was not finite.
        cause: The likely cause, one sentence.
        fix: What to do, one sentence.
        first_nonfinite_layer: The first layer, in model order, that made inf/NaN from
            finite inputs when the bad batch was run again (None: not found or not checked).
        bad_inputs: The bad batch itself (inputs or targets) held inf/NaN.
    """

    kind: str
    trigger: str
    epoch: int
    batch: int
    step: int
    loss: Optional[float]
    loss_scale: float
    skipped_steps: int
    first_nonfinite_variable: Optional[str]
    cause: str
    fix: str
    first_nonfinite_layer: Optional[str] = None
    bad_inputs: bool = False

    def message(self) -> str:
        variable = self.first_nonfinite_variable or "unknown"
        layer = (f", first layer to go non-finite={self.first_nonfinite_layer}"
                 if self.first_nonfinite_layer else "")
        data = ", the batch itself holds inf/NaN" if self.bad_inputs else ""
        return (
            f"tfmp: {self.trigger.replace('_', ' ')} at epoch {self.epoch}, batch {self.batch} "
            f"(step {self.step}), diagnosed as {self.kind}: loss={self.loss}, "
            f"loss_scale={self.loss_scale:g}, skipped_steps={self.skipped_steps}, first "
            f"non-finite variable={variable}{layer}{data}. Likely cause: {self.cause}. "
            f"Fix: {self.fix}."
        )


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What is known about an event when it is diagnosed.

    Attributes:
        trigger: `"nonfinite_loss"` or `"scale_at_minimum"`.
        half: The 16-bit dtype the model computes in (`"float16"`, `"bfloat16"`), or
            None under float32.
        variable: The first variable whose gradient was not finite.
        min_scale: The loss scale's floor; `count`: steps in a row pinned there.
        bad_inputs: The kept batch holds inf/NaN (None: no batch was kept).
        layer: The first layer that made inf/NaN from finite inputs (or whose output
            was not finite) when the batch ran again as it ran in training (None: that
            run was finite, or did not happen).
        float32_finite: The same batch with the same weights was finite in float32
            (None: not run). `float32_layer`: the first layer that made inf/NaN there;
            `float32_op`: the type of the op in it that did.
        largest_weight: `(variable, largest absolute value)` of the trainable weights.
        nonfinite_weights: The trainable weights holding inf/NaN.
        learning_rate: The optimizer's learning rate now (None: unknown).
        clipping: The optimizer already clips gradients.
        bfloat16_fast: The hardware computes bfloat16 natively (`auto` picks it).
        not_kept: Why no batch was kept for the event (None: one was).
    """

    trigger: str
    half: Optional[str]
    variable: Optional[str] = None
    min_scale: float = 1.0
    count: int = 0
    bad_inputs: Optional[bool] = None
    layer: Optional[str] = None
    float32_finite: Optional[bool] = None
    float32_layer: Optional[str] = None
    float32_op: Optional[str] = None
    largest_weight: Optional[tuple[str, float]] = None
    nonfinite_weights: tuple[str, ...] = ()
    learning_rate: Optional[float] = None
    clipping: bool = False
    bfloat16_fast: bool = False
    not_kept: Optional[str] = None


# Ops that make inf/NaN from finite inputs by leaving their domain (log of 0, division by
# 0, root of a negative), not by the size of their inputs: their layer's code is suspect.
DOMAIN_OPS = frozenset(("Log", "Log1p", "Sqrt", "Rsqrt", "RealDiv", "Div", "Reciprocal",
                        "Inv", "Pow", "Xlogy", "Xdivy", "Acos", "Asin", "Atanh", "Lgamma",
                        "Digamma"))


def _lower_lr(e: Evidence) -> str:
    now = f" (now {e.learning_rate:g})" if e.learning_rate is not None else ""
    return f"lower the learning rate{now}" + ("" if e.clipping else " or clip gradients (clipnorm=1.0)")


def _or_bfloat16(e: Evidence) -> str:
    """The advice to switch to bfloat16, where it applies: a float16 run on hardware that
    computes bfloat16 natively."""
    return ", or switch to bfloat16 (mixed_bfloat16)" if e.half == "float16" and e.bfloat16_fast else ""


def _weights(e: Evidence) -> str:
    if e.nonfinite_weights:
        return f"the weights {', '.join(e.nonfinite_weights)} already hold inf/NaN"
    if e.largest_weight:
        return f"the largest weight is now {e.largest_weight[1]:.3g} ({e.largest_weight[0]})"
    return "no weight could be read"


def _not_precision(e: Evidence, what: str) -> tuple[str, str, str]:
    """Non-finite in float32 too: the op's domain (the layer's code) or the updates."""
    same = (f"the same batch with the same weights makes {what} non-finite in float32 too, "
            "so precision is not the cause")
    if e.float32_layer and e.float32_op in DOMAIN_OPS:
        return (DIVERGENCE, f"{same}: {e.float32_layer}'s {e.float32_op} gets inputs outside "
                            f"its domain ({_weights(e)})",
                f"check what {e.float32_layer} passes to {e.float32_op} (log of 0 or of a "
                f"negative, division by 0, root of a negative); if the weights grew, "
                f"{_lower_lr(e)}")
    inside = (f"; {e.float32_layer}'s {e.float32_op or 'op'} makes inf/NaN from finite inputs "
              "in float32" if e.float32_layer else "")
    return (DIVERGENCE, f"{same}: {_weights(e)}{inside}",
            f"{_lower_lr(e)}; resume from a backup made before it diverged")


def _precision(e: Evidence) -> tuple[str, str, str]:
    """Finite in float32 where the run's 16 bits are not."""
    if e.trigger == SCALE_AT_MINIMUM:
        return (PRECISION, f"gradients overflowed {e.count} step(s) in a row with the loss "
                           f"scale at its minimum {e.min_scale:g}: they are too large for "
                           f"{e.half} (the same batch's gradients are finite in float32)",
                f"let the scale go lower (min_scale={e.min_scale / 256:g}: the scale shrinks "
                f"the gradients into {e.half}'s range){_or_bfloat16(e)}, or train in float32")
    auto = " (or float32_layers='auto' with calibration_data)" if e.half == "float16" else ""
    why = ("bfloat16's 8 bits of precision round its values (its range is float32's)"
           if e.half == "bfloat16" else "its values leave float16's range or precision")
    return (PRECISION, f"{e.layer} made inf/NaN from finite inputs in {e.half} and the same "
                       f"batch is finite in float32: {why}",
            f"keep {e.layer} in float32: tfmp.prepare(..., float32_layers=[{e.layer!r}])"
            f"{auto}{_or_bfloat16(e)}")


def diagnose(e: Evidence) -> tuple[str, str, str]:
    """`(kind, cause, fix)` for an event: data, divergence, precision, or unverified.

    Precision is blamed only when the float32 run of the same batch with the same
    weights was finite (and, for a non-finite loss, the 16-bit run of it was not); a
    precision the run already uses, bfloat16 on hardware without it, and clipping to
    an optimizer that clips, are never advised.

    Args:
        e: The `Evidence`.

    Returns:
        The kind (one of `KINDS`), the likely cause and the fix, one sentence each.
    """
    if e.bad_inputs:
        return (DATA, "the batch itself holds inf/NaN: bad input data, which neither loss "
                      "scaling nor another precision can fix",
                "check the data for NaN/inf: drop or repair those records")
    what = "the loss" if e.trigger == NONFINITE_LOSS else "the gradients"
    if e.float32_finite is False:
        return _not_precision(e, what)
    if e.float32_finite and e.half and (e.layer or e.trigger == SCALE_AT_MINIMUM):
        return _precision(e)
    if e.not_kept or e.float32_finite is None:
        cause = (f"the bad batch was not kept ({e.not_kept})" if e.not_kept
                 else "the bad batch could not be run again")
        cause += ", so the cause was not checked: bad data or divergence"
    else:
        cause = ("the bad batch ran finite when run again with the same weights: not "
                 "reproducible (a random op such as dropout, or a transient fault)")
    fix = f"check the data for NaN/inf, {_lower_lr(e)}"
    if e.half:
        cause += f", or values past the {e.half} range"
        fix += ("; if it only happens in 16 bits, keep the overflowing layer in float32 "
                f"(tfmp.locate_overflows names it){_or_bfloat16(e)}")
    return UNVERIFIED, cause, fix


class NonFiniteError(RuntimeError):
    """Raised by `NanMonitor(on_nan="raise")`; `.event` is the `NanEvent`.

    Args:
        event: The event that stopped training.
    """

    def __init__(self, event: NanEvent) -> None:
        self.event = event
        super().__init__(event.message())
