"""`tfmp.compare_precision`: the float32-vs-mixed A/B check users run before trusting mixed precision.

Every policy trains the same model from identical initial weights on identical
batches, the policies taking turns step by step (so their step times are
measured side by side, not minutes apart on a machine whose speed drifts).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import keras
import numpy as np
from absl import logging

from tfmp.measure.losses import choose_loss
from tfmp.measure.stats import batches_phrase, quartiles
from tfmp.measure.steps import train_step
from tfmp.precision import HardwareInfo, detect_hardware, policy_scope, resolve_policy
from tfmp.precision.policy import FLOAT32, MIXED_BFLOAT16, MIXED_FLOAT16
from tfmp.preparation import prepare

WARMUP_STEPS = 2  # tracing (and XLA's compilation) happens here: not timed
XLA_SUFFIX = "+xla"  # `float32+xla`: the policy with the train step compiled by XLA
FAILED_ARM = "tfmp_arm"  # attribute of an error raised by one policy's step: that policy's label
# A policy with its weights stored in its 16-bit dtype (`tfmp.prepare(..., weights_dtype=)`).
WEIGHTS_VARIANTS = {"bf16w": (MIXED_BFLOAT16, "bfloat16"), "fp16w": (MIXED_FLOAT16, "float16")}


def weights_variant(name: str) -> tuple[str, Optional[str]]:
    """A policy name, or a `WEIGHTS_VARIANTS` name (`bf16w`: mixed_bfloat16 with bfloat16
    weights), split into the policy and the weights' dtype.

    Args:
        name: A policy name without `+xla` (`parse_variant`'s first part).

    Returns:
        `(policy name, weights_dtype)`: None for float32 weights.
    """
    return WEIGHTS_VARIANTS.get(name.lower(), (name, None))


def parse_variant(label: str) -> tuple[str, bool]:
    """A label `compare_precision` accepts, split into the policy name and whether XLA compiles.

    Args:
        label: A policy name `tfmp.set_policy` accepts, optionally followed by `+xla`
            (`"bf16+xla"`, `"float32+XLA"`).

    Returns:
        `(policy name, jit_compile)`; the name is not resolved here.
    """
    name = "".join(label.split())  # " bf16 + XLA " too
    if name.lower().endswith(XLA_SUFFIX):
        return name[:-len(XLA_SUFFIX)], True
    return name, False


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    """What one policy did, step by step.

    Attributes:
        label: The name asked for (`"auto"`, `"bf16"`, ...).
        policy: The policy it resolved to.
        losses: Unscaled training loss of every step.
        grad_norms: Global norm of the unscaled gradients of every step.
        loss_scales: Loss scale after every step (1 without loss scaling).
        step_seconds: Wall time of every step (the first `WARMUP_STEPS` include tracing).
        skipped_steps: Steps the optimizer skipped (non-finite gradients).
        final_metrics: `model.evaluate` on `eval_data`, or the mean loss of the last tenth of the steps.
        jit_compile: Whether XLA compiled the train step (a `+xla` label).
        weights_dtype: The 16-bit dtype its weights were stored in (a `bf16w`/`fp16w`
            label), or None (float32 weights).
    """

    label: str
    policy: str
    losses: tuple[float, ...]
    grad_norms: tuple[float, ...]
    loss_scales: tuple[float, ...]
    step_seconds: tuple[float, ...]
    skipped_steps: int
    final_metrics: dict[str, float]
    jit_compile: bool = False
    weights_dtype: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One policy against the baseline (the first policy).

    Attributes:
        label: The policy's label.
        max_relative_loss_gap: Largest `|loss - baseline loss| / |baseline loss|` over the
            steps (`inf` if a loss was not finite).
        grad_norm_ratio: Quartiles (25%, 50%, 75%) of the per-step ratio of gradient norms.
        throughput_ratio: Quartiles of the per-step ratio `baseline step time / step time`
            (above 1: faster than the baseline), steps after the warm-up.
        passed: The gap is within the tolerance and every loss is finite.
        reason: One sentence saying why.
    """

    label: str
    max_relative_loss_gap: float
    grad_norm_ratio: tuple[float, float, float]
    throughput_ratio: tuple[float, float, float]
    passed: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of `compare_precision`: `ok`, `verdicts`, `runs`, `to_dict()`, `str()`.

    Attributes:
        tolerance: The largest relative loss gap that passed.
        steps: Training steps per policy.
        runs: One `PolicyRun` per policy, the baseline first.
        verdicts: One `Verdict` per policy after the baseline.
        loss: The loss every policy trained with, and why: `"<loss>: <why>"` (given,
            the model's compiled loss, or the output's kind: probabilities or logits).
    """

    tolerance: float
    steps: int
    runs: tuple[PolicyRun, ...]
    verdicts: tuple[Verdict, ...]
    loss: str = ""

    @property
    def ok(self) -> bool:
        """True when every policy passed."""
        return all(v.passed for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (non-finite numbers as strings)."""
        return _json_safe(dataclasses.asdict(self) | {"ok": self.ok})

    def __str__(self) -> str:
        base = self.runs[0]
        lines = [f"tfmp compare_precision: {self.steps} steps, baseline {base.label} "
                 f"({base.policy}), tolerance {self.tolerance:g}", f"loss: {self.loss}"]
        header = ("policy", "max loss gap", "grad-norm ratio", "speed vs baseline", "skipped",
                  "verdict")
        rows = [header]
        for run, v in zip(self.runs[1:], self.verdicts):
            rows.append((f"{run.label} ({run.policy})", f"{v.max_relative_loss_gap:.3g}",
                         f"{v.grad_norm_ratio[1]:.3f}",
                         f"{v.throughput_ratio[1]:.2f}x ({v.throughput_ratio[0]:.2f}-"
                         f"{v.throughput_ratio[2]:.2f})",
                         str(run.skipped_steps), "pass" if v.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"{v.label}: {v.reason}" for v in self.verdicts]
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _batches(dataset: Any, steps: int) -> list[tuple[Any, Any]]:
    taken = list(dataset.take(steps).as_numpy_iterator())
    if len(taken) < steps:
        raise ValueError(f"the dataset gave {len(taken)} batches; steps={steps} needs that many "
                         "(repeat it, or ask for fewer steps)")
    return taken


def _fresh_model(reference: keras.Model, weights: list, build_model: Callable[[], keras.Model],
                 hardware: HardwareInfo) -> keras.Model:
    """A new model from `build_model` holding the reference's initial weights, for a policy
    after one whose `prepare` converted the reference in place."""
    with policy_scope(FLOAT32, hardware):
        model = build_model()
    if model is reference:
        raise ValueError(
            f"build_model returned the same {type(model).__name__} twice: a model of this kind "
            "is converted in place, so compare_precision needs a new one per policy")
    model.set_weights(weights)
    return model


class _Arm:
    """One policy's model, optimizer and compiled train step."""

    def __init__(self, label: str, policy: str, jit_compile: bool, weights_dtype: Optional[str],
                 reference: keras.Model, make_optimizer: Callable[[], keras.optimizers.Optimizer],
                 loss_fn: Any, hardware: HardwareInfo, **prepare_args: Any) -> None:
        self.label, self.policy, self.jit_compile = label, policy, jit_compile
        self.weights_dtype = weights_dtype
        with policy_scope(policy, hardware):
            self.model, self.opt = prepare(reference, make_optimizer(), policy, guard=True,
                                           hardware=hardware, weights_dtype=weights_dtype,
                                           **prepare_args)
        self.opt.build(self.model.trainable_variables)
        self.loss_fn = loss_fn
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.scales: list[float] = []
        self.seconds: list[float] = []
        self._step = train_step(self.model, self.opt, loss_fn, jit_compile=jit_compile)

    def step(self, x, y) -> None:
        start = time.perf_counter()
        loss, norm = self._step(x, y)
        loss = float(loss)  # waits for the step
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss)
        self.norms.append(float(norm))
        self.scales.append(self.opt.loss_scale)

    def result(self, eval_data: Any, metrics: Sequence[Any]) -> PolicyRun:
        if eval_data is not None:
            logging.info("tfmp.compare_precision: evaluating %s (%s) on %s", self.label,
                         self.policy, batches_phrase(eval_data))
            self.model.compile(self.opt, self.loss_fn, metrics=list(metrics))
            final = self.model.evaluate(eval_data, verbose=0, return_dict=True)
        else:
            tail = self.losses[-max(len(self.losses) // 10, 1):]
            final = {"loss": float(np.mean(tail))}
        return PolicyRun(self.label, self.policy, tuple(self.losses), tuple(self.norms),
                         tuple(self.scales), tuple(self.seconds),
                         int(self.opt.skipped_steps.numpy()),
                         {k: float(v) for k, v in final.items()}, self.jit_compile,
                         self.weights_dtype)


def _verdict(base: _Arm, arm: _Arm, tolerance: float) -> Verdict:
    gaps = [abs(a - b) / max(abs(b), 1e-12) if math.isfinite(a) else math.inf
            for a, b in zip(arm.losses, base.losses)]
    gap = max(gaps)
    norm_ratio = quartiles([a / b for a, b in zip(arm.norms, base.norms)
                             if math.isfinite(a) and math.isfinite(b) and b > 0])
    speed = quartiles([b / a for a, b in zip(arm.seconds[WARMUP_STEPS:],
                                              base.seconds[WARMUP_STEPS:])])
    if not all(math.isfinite(v) for v in arm.losses):
        first = next(i for i, v in enumerate(arm.losses) if not math.isfinite(v))
        passed, reason = False, (f"the loss was not finite from step {first} on where "
                                 f"{base.label} stayed finite: a {arm.policy} op overflows")
    elif gap > tolerance:
        worst = gaps.index(gap)
        passed, reason = False, (f"the loss drifted {gap:.3g} (relative) from {base.label} at "
                                 f"step {worst}, above the tolerance {tolerance:g}")
    else:
        passed, reason = True, f"the loss stayed within {gap:.3g} of {base.label}"
    return Verdict(arm.label, gap, norm_ratio, speed, passed, reason)


def compare_precision(
    build_model: Callable[[], keras.Model],
    dataset: Any,
    *,
    policies: Sequence[str] = (FLOAT32, "auto"),
    steps: int = 50,
    seed: int = 0,
    loss: Any = None,
    optimizer: Union[str, Callable[[], keras.optimizers.Optimizer]] = "adam",
    tolerance: float = 0.05,
    eval_data: Any = None,
    metrics: Sequence[Any] = (),
    hardware: Optional[HardwareInfo] = None,
    float32_layers: Any = (),
) -> Comparison:
    """Trains `build_model()` under each policy from identical weights on identical batches.

    The model is built in float32, with `seed`; each policy gets it, with the
    same initial weights, through `tfmp.prepare` (the policy, float32 outputs,
    loss scaling where needed, the NaN guard). The policies take turns step by
    step on the same batches; the first policy is the baseline.

    Args:
        build_model: Returns a new, built Keras model of any kind. Sequential and
            Functional models are built once and copied for each policy; a model
            `prepare` converts in place (subclassed, keras-hub) is built once per
            policy, each given the first one's weights.
        dataset: A `tf.data.Dataset` of `(inputs, labels)` batches, at least `steps` long.
        policies: Names `tfmp.set_policy` accepts, or `bf16w` / `fp16w` (mixed_bfloat16 /
            mixed_float16 with the weights stored in 16 bits, `tfmp.prepare`'s
            `weights_dtype`), each optionally followed by `+xla` (the train step compiled by
            XLA, `jit_compile=True`); the first is the baseline.
        steps: Training steps per policy.
        seed: Seed for the initial weights.
        loss: A Keras loss (name, `keras.losses.Loss`, or function of `(y_true, y_pred)`).
            Default: the model's compiled loss, else one that matches its output, read
            from its traced graph: sparse categorical cross-entropy with
            `from_logits=False` after a softmax, `True` on logits; binary cross-entropy
            after a sigmoid. `Comparison.loss` says which, and why.
        optimizer: A Keras optimizer name, or a function returning a new optimizer.
        tolerance: Largest relative loss gap to the baseline a policy may show and pass.
        eval_data: Optional dataset for `model.evaluate` at the end (`final_metrics`).
        metrics: Metrics for that evaluation.
        hardware: The hardware `auto` decides for; detected when omitted.
        float32_layers: Passed to `tfmp.prepare` for every policy: layers to keep in
            float32, or `"auto"` (`tfmp.locate_overflows` on the first batches of
            `dataset`, under each 16-bit policy).

    Returns:
        A `Comparison`: `.ok`, `.verdicts` (gap, gradient-norm and speed ratios, pass/fail),
        `.runs` (per-step losses, gradient norms, loss scales, step times), `str()`, `to_dict()`.

    Raises:
        ValueError: fewer than two policies, a bad name, `steps` or `tolerance` out of
            range, a dataset shorter than `steps`, or no loss that fits (a loss per
            output compiled, outputs needing different losses: give `loss=`). An error
            from one policy's train step is raised as it is, with that policy's label
            in its `tfmp_arm` attribute.

    Example:
    >>> result = tfmp.compare_precision(build, train_ds, policies=("fp32", "bf16"), steps=100)
    >>> print(result)
    >>> assert result.ok, result.verdicts
    """
    if len(policies) < 2:
        raise ValueError(f"policies={tuple(policies)!r}: give a baseline and at least one more")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= WARMUP_STEPS:
        raise ValueError(f"steps={steps!r} must be an integer above {WARMUP_STEPS}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r} must be a positive number")
    hw = hardware if hardware is not None else detect_hardware()
    resolved = []
    for label in policies:
        name, jit = parse_variant(label)
        name, weights_dtype = weights_variant(name)
        resolved.append((label, resolve_policy(name, hw).name, jit, weights_dtype))
    batches = _batches(dataset, steps)
    make_optimizer = (optimizer if callable(optimizer)
                      else lambda: keras.optimizers.get(optimizer))
    keras.utils.set_random_seed(seed)
    with policy_scope(FLOAT32, hw):
        reference = build_model()
    weights, source, arms = reference.get_weights(), reference, []
    chosen = choose_loss(reference, loss, batches[0])  # traces it: after the weights are read
    for i, (label, policy, jit, weights_dtype) in enumerate(resolved):
        arms.append(_Arm(label, policy, jit, weights_dtype, source, make_optimizer, chosen.fn, hw,
                         float32_layers=float32_layers, calibration_data=dataset))
        if arms[-1].model is source and i + 1 < len(resolved):  # converted in place: the
            source = _fresh_model(reference, weights, build_model, hw)  # next needs its own
    logging.info("tfmp.compare_precision: training %s for %d steps, taking turns step by step",
                 ", ".join(label for label, *_ in resolved), steps)
    for i, (x, y) in enumerate(batches):
        for arm in arms if i % 2 == 0 else reversed(arms):  # alternate who goes first
            try:
                arm.step(x, y)
            except Exception as e:
                setattr(e, FAILED_ARM, arm.label)  # which policy failed (tune drops an XLA one)
                raise
    base = arms[0]
    return Comparison(
        tolerance=float(tolerance), steps=steps,
        runs=tuple(arm.result(eval_data, metrics) for arm in arms),
        verdicts=tuple(_verdict(base, arm, tolerance) for arm in arms[1:]),
        loss=chosen.description,
    )
