"""A non-finite event that needs attention, its diagnosis, and the error `on_nan="raise"` raises."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class NanEvent:
    """A non-finite event that needs attention, with its diagnosis.

    `kind` is `"nonfinite_loss"` (the unscaled loss was NaN/inf: bad data or
    divergence) or `"scale_at_minimum"` (gradients overflowed with the scale
    pinned at its floor for `patience` steps). Overflows that loss scaling
    recovers from are counted, not reported as events.

    Attributes:
        kind: `"nonfinite_loss"` or `"scale_at_minimum"`.
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
            f"tfmp: {self.kind.replace('_', ' ')} at epoch {self.epoch}, batch {self.batch} "
            f"(step {self.step}): loss={self.loss}, loss_scale={self.loss_scale:g}, "
            f"skipped_steps={self.skipped_steps}, first non-finite variable={variable}"
            f"{layer}{data}. Likely cause: {self.cause}. Fix: {self.fix}."
        )


def diagnose(kind: str, *, policy: str, variable: Optional[str], min_scale: float,
             count: int, layer: Optional[str] = None, bad_inputs: bool = False) -> tuple[str, str]:
    """`(cause, fix)` for a NaN event of `kind`; `layer`: the first layer that made inf/NaN
    from finite inputs on the bad batch; `bad_inputs`: the batch itself held inf/NaN."""
    if bad_inputs:
        return ("the batch itself holds inf/NaN: bad input data, which loss scaling cannot fix",
                "check the data for NaN/inf: drop or repair those records")
    if layer:
        keep = f"keep {layer} in float32: tfmp.prepare(..., float32_layers=[{layer!r}])"
        if kind == "nonfinite_loss" and policy not in ("mixed_float16", "mixed_bfloat16"):
            return (f"{layer} made inf/NaN from finite inputs in {policy}: divergence or an "
                    "op outside its domain", "lower the learning rate, check that layer's code")
        return (f"{layer} made inf/NaN from finite inputs: its values leave the 16-bit range",
                f"{keep} (or float32_layers='auto' with calibration_data), or switch to bfloat16")
    keep = f"keep the layer of {variable} in float32" if variable else "keep the overflowing layer in float32"
    keep += " (tfmp.locate_overflows(model, a few batches) names the layer)"
    if kind == "nonfinite_loss":
        cause = ("the loss itself is not finite: bad input data or divergence, which loss "
                 "scaling cannot fix")
        fix = "check the data for NaN/inf, lower the learning rate"
        if policy == "mixed_float16":
            fix += f"; if it only happens in float16, {keep} or switch to bfloat16"
        return cause, fix
    cause = (f"gradients overflowed {count} step(s) in a row with the loss scale at its "
             f"minimum {min_scale:g}: they are too large for float16")
    return cause, f"lower the learning rate or clip gradients, switch to bfloat16, or {keep}"


class NonFiniteError(RuntimeError):
    """Raised by `NanMonitor(on_nan="raise")`; `.event` is the `NanEvent`.

    Args:
        event: The event that stopped training.
    """

    def __init__(self, event: NanEvent) -> None:
        self.event = event
        super().__init__(event.message())
