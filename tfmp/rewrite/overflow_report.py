"""`OverflowReport`: what `tfmp.locate_overflows` found, per layer, as a table and as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import keras

from tfmp.precision.ranges import HALF_MAX

MODEL_OWN = "<model>"  # tracing.MODEL_PATH: the model's own ops (its `call`)


@dataclasses.dataclass(frozen=True)
class LayerOverflow:
    """One layer as the locator saw it.

    Attributes:
        path: Its path in the model (`outer/inner`; `<model>`: the model's own `call`).
        class_name: Its class.
        largest: The largest finite absolute value its own ops computed in 16 bits (its
            outputs and its intermediates), over the batches.
        nonfinite_steps: Batches on which one of its ops made inf/NaN from finite inputs.
        first_step: The first such batch (0-based), or None.
        op: The op type that did (`Square`, `Rsqrt`, ...), or None.
        nonfinite_output_steps: Batches on which one of its outputs was not finite (made
            there or received from an earlier layer).
        gradient_underflow: The share of its nonzero activation gradients (of the loss x
            the loss scale, measured in float32) below float16's smallest value 2**-24, or
            None when not measured (no loss or targets; bfloat16).
        reason: Why it must compute in float32 ("" when it need not).
    """

    path: str
    class_name: str
    largest: float
    nonfinite_steps: int
    first_step: Optional[int]
    op: Optional[str]
    nonfinite_output_steps: int
    gradient_underflow: Optional[float]
    reason: str

    @property
    def condemned(self) -> bool:
        """Whether it must compute in float32."""
        return bool(self.reason)

    def with_underflow(self, share: float) -> "LayerOverflow":
        """A copy with `gradient_underflow` set."""
        return dataclasses.replace(self, gradient_underflow=share)


@dataclasses.dataclass(frozen=True)
class OverflowReport:
    """What `tfmp.locate_overflows` found.

    Attributes:
        policy: The 16-bit policy checked.
        steps: Batches run.
        loss_scale: The scale the activation gradients were measured at.
        margin: The share of the 16-bit maximum past which a layer is condemned.
        rows: Every layer that ran, in the order its first call began.
        nonfinite_input_steps: Batches whose inputs already held inf/NaN (bad data: no
            layer is to blame for what they carry).
        keras_paths: Keras' `layer.path` of each row's layer in the caller's model.
    """

    policy: str
    steps: int
    loss_scale: float
    margin: float
    rows: tuple[LayerOverflow, ...]
    nonfinite_input_steps: tuple[int, ...] = ()
    keras_paths: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> tuple[LayerOverflow, ...]:
        """The layers that must compute in float32, in model order."""
        return tuple(row for row in self.rows if row.condemned)

    @property
    def paths(self) -> list[str]:
        """Their paths, for `tfmp.prepare(..., float32_layers=...)` (the model's own `call`
        left out: no policy reaches it; its code must cast)."""
        return [row.path for row in self.layers if row.path != MODEL_OWN]

    @property
    def ok(self) -> bool:
        """Whether no layer must compute in float32."""
        return not self.layers

    def first_nonfinite_output(self) -> Optional[str]:
        """The first layer, in model order, whose output was not finite on some batch."""
        return next((row.path for row in self.rows if row.nonfinite_output_steps
                     and row.path != MODEL_OWN), None)

    @property
    def policy_map(self) -> keras.dtype_policies.DTypePolicyMap:
        """A `keras.dtype_policies.DTypePolicyMap`: the condemned layers float32 (keyed by
        Keras' `layer.path`), every other layer the 16-bit policy. For a model whose
        constructor takes `dtype=` for its sublayers (keras-hub backbones); on a built
        model use `tfmp.prepare(..., float32_layers=report.paths)`."""
        policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=self.policy)
        for path in self.paths:
            policy_map[self.keras_paths.get(path, path)] = keras.dtype_policies.get("float32")
        return policy_map

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (`layers`: path -> why, and every row)."""
        return {"policy": self.policy, "steps": self.steps, "loss_scale": self.loss_scale,
                "margin": self.margin, "float32_layers": {r.path: r.reason for r in self.layers},
                "nonfinite_input_steps": list(self.nonfinite_input_steps),
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        half = keras.dtype_policies.get(self.policy).compute_dtype
        head = (f"overflow check under {self.policy}: {self.steps} batch(es), loss scale "
                f"{self.loss_scale:g}, condemned past {self.margin:g} x {HALF_MAX[half]:.5g}")
        lines = [head, f"{'layer':<32} {'class':<20} {'largest':>10} {'inf/NaN':>8} "
                       f"{'grad<2^-24':>10}  verdict"]
        for r in self.rows:
            under = "-" if r.gradient_underflow is None else f"{100 * r.gradient_underflow:.1f}%"
            lines.append(f"{r.path[:32]:<32} {r.class_name[:20]:<20} {r.largest:>10.4g} "
                         f"{r.nonfinite_steps:>8} {under:>10}  "
                         f"{'float32: ' + r.reason if r.reason else 'ok'}")
        if self.nonfinite_input_steps:
            lines.append(f"the inputs themselves held inf/NaN on batch(es) "
                         f"{', '.join(map(str, self.nonfinite_input_steps))}: bad data")
        found = self.paths
        if any(r.path == MODEL_OWN for r in self.layers):
            lines.append("the model's own call (between its layers) overflows: no policy reaches "
                         "it; cast to float32 in its code")
        if found:
            lines.append(f"keep in float32: tfmp.prepare(..., float32_layers={found!r})")
        elif self.ok:
            lines.append("no layer needs float32")
        return "\n".join(lines)
