"""`DynamicLossScaleOptimizer`: Keras' LossScaleOptimizer that cannot fail silently.

Compared with `keras.optimizers.LossScaleOptimizer` it adds a floor and a
ceiling on the scale, configurable growth and backoff, hysteresis, a fixed
(`dynamic=False`) mode that doubles as a NaN guard, counters of skipped steps
saved with the optimizer, distribution-safe skipping (every replica skips when
any replica overflows) and gradient accumulation under `MirroredStrategy`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from keras.src.utils import tracking  # the decorator Keras uses on LossScaleOptimizer.build

from tfmp.distributed import any_replica, check_merge_call_free, cross_replica_apply, update_step

_INT = "int"
# Scales are float32 variables: below the smallest normal float32 TensorFlow
# flushes them to 0 on CPU (the scale would read 0.0 and unscaling would
# divide by zero), above the largest they are inf.
FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # ~1.18e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)  # ~3.4e38
DEFAULT_INITIAL_SCALE = 2.0**15
DEFAULT_GROWTH_INTERVAL = 2000
DEFAULT_MIN_SCALE = 1.0
DEFAULT_MAX_SCALE = 2.0**24


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    kind = "a positive integer" if integer else "a positive finite number"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be {kind}; got {name}={value!r}.")


def check_scale(name: str, value: float) -> None:
    _check_number(name, value)
    if not FLOAT32_MIN_NORMAL <= value <= FLOAT32_MAX:
        raise ValueError(
            f"`{name}` must lie within float32's normal range [{FLOAT32_MIN_NORMAL:.4g}, "
            f"{FLOAT32_MAX:.4g}] (smaller scales are flushed to 0 and larger ones are inf); "
            f"got {name}={value!r}."
        )


def default_scale_bounds(initial_scale: float, min_scale: Optional[float],
                         max_scale: Optional[float]) -> tuple[float, float]:
    """`(min_scale, max_scale)` with defaults filled in.

    The floor defaults to 1 and the ceiling to 2**24, widened to `initial_scale`
    when it lies outside them, so that every scale stock Keras accepts is accepted.
    """
    if min_scale is None:
        min_scale = min(DEFAULT_MIN_SCALE, initial_scale)
    if max_scale is None:
        max_scale = max(DEFAULT_MAX_SCALE, initial_scale)
    return min_scale, max_scale


def validate_scale_args(
    initial_scale: float,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    min_scale: float,
    max_scale: float,
    hysteresis: int,
) -> None:
    """Raises `ValueError` naming the first argument that is out of range."""
    for name, value in (("initial_scale", initial_scale), ("min_scale", min_scale),
                        ("max_scale", max_scale)):
        check_scale(name, value)
    for name, value in (("growth_factor", growth_factor), ("backoff_factor", backoff_factor)):
        _check_number(name, value)
    _check_number("growth_interval", growth_interval, integer=True)
    _check_number("hysteresis", hysteresis, integer=True)
    if growth_factor <= 1:
        raise ValueError(f"`growth_factor` must be > 1; got growth_factor={growth_factor!r}.")
    if backoff_factor >= 1:
        raise ValueError(
            f"`backoff_factor` must be in (0, 1); got backoff_factor={backoff_factor!r}."
        )
    if not min_scale <= initial_scale <= max_scale:
        raise ValueError(
            "Need min_scale <= initial_scale <= max_scale; got "
            f"min_scale={min_scale!r}, initial_scale={initial_scale!r}, max_scale={max_scale!r}."
        )


def _one_of(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    """tfmp's argument `name` or its stock Keras spelling `alias`; both only if equal."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(
            f"`{name}` and `{alias}` (its stock Keras name) disagree: "
            f"{name}={value!r}, {alias}={alias_value!r}; give one of them."
        )
    for candidate in (value, alias_value):
        if candidate is not None:
            return candidate
    return default


@keras.saving.register_keras_serializable(package="tfmp")
class DynamicLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """A loss-scale optimizer with a floor, a ceiling, hysteresis and counters.

    A drop-in for `keras.optimizers.LossScaleOptimizer`: the same positional
    arguments (`inner_optimizer, initial_scale, dynamic_growth_steps, name`),
    the same keyword arguments and the same saved config; `dynamic=False` is
    accepted (a fixed scale) where stock Keras rejects it.

    Gradients are unscaled first and the decision is made on the unscaled
    gradients. On a step whose gradients are all finite they are passed to the
    inner optimizer; after `growth_interval` such updates in a row the scale is
    multiplied by `growth_factor` (never above `max_scale`). On a step with
    any non-finite gradient (on any replica) no variable is updated,
    `skipped_steps` grows by one, and after `hysteresis` such steps the scale
    is multiplied by `backoff_factor` (never below `min_scale`). As in
    Megatron and DeepSpeed, once the hysteresis budget is used up every
    further overflow backs off until the scale next grows, which refills it.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap. Put
            `gradient_accumulation_steps`, `use_ema`, `weight_decay` and clipping
            on it.
        initial_scale: Starting loss scale.
        dynamic_growth_steps: Stock Keras' name for `growth_interval`.
        name: Optimizer name.
        growth_interval: Clean optimizer updates in a row before the scale
            grows (under gradient accumulation: updates, not micro-batches).
            Default 2000.
        growth_factor: Multiplier (> 1) applied after `growth_interval` clean updates.
        backoff_factor: Multiplier in (0, 1) applied on overflow.
        min_scale: The scale never goes below this (no collapse to 0). Default
            1, or `initial_scale` if that is lower.
        max_scale: The scale never goes above this. Default 2**24, or
            `initial_scale` if that is higher. Every scale must lie within
            float32's normal range.
        hysteresis: Non-finite steps tolerated before backing off (1 = back off
            on the first, like Keras and PyTorch).
        dynamic: If False the scale stays at `initial_scale`; non-finite steps
            are still skipped and counted (a NaN guard, for bf16 and float32
            use `initial_scale=1.0`).

    Raises:
        ValueError: An argument is out of range, or `growth_interval` and
            `dynamic_growth_steps` disagree; the message names them and their values.

    Example:
    >>> opt = tfmp.DynamicLossScaleOptimizer(keras.optimizers.Adam(), min_scale=1.0)
    >>> model.compile(optimizer=opt, loss="mse")  # compile() does not wrap it again
    >>> model.fit(x, y)
    >>> int(opt.skipped_steps), float(opt.dynamic_scale), opt.first_nonfinite_variable
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        initial_scale: float = DEFAULT_INITIAL_SCALE,
        dynamic_growth_steps: Optional[int] = None,
        name: Optional[str] = None,
        *,
        growth_interval: Optional[int] = None,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        min_scale: Optional[float] = None,
        max_scale: Optional[float] = None,
        hysteresis: int = 1,
        dynamic: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer; got "
                f"{inner_optimizer!r}."
            )
        if isinstance(inner_optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "`inner_optimizer` is already a LossScaleOptimizer; wrapping it "
                "again would scale the loss twice. Use tfmp.wrap_optimizer(), which "
                "converts it."
            )
        if not isinstance(dynamic, bool):
            raise ValueError(f"`dynamic` must be True or False; got dynamic={dynamic!r}.")
        growth_interval = _one_of("growth_interval", growth_interval, "dynamic_growth_steps",
                                  dynamic_growth_steps, DEFAULT_GROWTH_INTERVAL)
        check_scale("initial_scale", initial_scale)
        min_scale, max_scale = default_scale_bounds(initial_scale, min_scale, max_scale)
        validate_scale_args(
            initial_scale, growth_factor, backoff_factor, growth_interval,
            min_scale, max_scale, hysteresis,
        )
        super().__init__(
            inner_optimizer,
            initial_scale=float(initial_scale),
            dynamic_growth_steps=int(growth_interval),
            name=name,
            **kwargs,
        )
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.hysteresis = int(hysteresis)
        self.dynamic = dynamic
        # Created here rather than in build(): scale_loss() may be traced before
        # the first apply() builds the optimizer (custom loops). Counts steps:
        # the flag is all-reduced, and only the first replica's update is kept.
        with keras.name_scope(self.name, caller=self):
            self.nonfinite_losses = keras.Variable(
                0.0, name="nonfinite_losses", dtype="float32", trainable=False,
                aggregation="only_first_replica",
            )

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list: Sequence[keras.Variable]) -> None:
        def counter(name: str, value: int) -> keras.Variable:
            return self.add_variable(
                shape=(), dtype=_INT, aggregation="none", name=name,
                initializer=keras.initializers.Constant(value),
            )

        self.skipped_steps = counter("skipped_steps", 0)
        self.last_skipped_step = counter("last_skipped_step", 0)
        self.first_nonfinite_index = counter("first_nonfinite_index", -1)
        self.hysteresis_left = counter("hysteresis_left", self.hysteresis)
        super().build(var_list)

    # ------------------------------------------------------------------ state

    @property
    def loss_scale(self) -> float:
        """The current loss scale, as a Python float."""
        return float(self.dynamic_scale.numpy()) if self.built else self.initial_scale

    @property
    def first_nonfinite_variable(self) -> Optional[str]:
        """Path of the first variable with a non-finite gradient at the last skipped step."""
        if not self.built:
            return None
        index = int(self.first_nonfinite_index.numpy())
        if not 0 <= index < len(self._trainable_variables):
            return None
        return self._trainable_variables[index].path

    def scale_loss(self, loss):
        """Multiplies `loss` by the scale; counts non-finite losses in `nonfinite_losses`.

        `nonfinite_losses` counts steps whose unscaled loss was NaN or inf on
        any replica: bad data or divergence, which no loss scale can fix.
        """
        bad = any_replica(ops.logical_not(ops.all(ops.isfinite(loss))))
        # ONLY_FIRST_REPLICA: every replica adds the same all-reduced flag once.
        self.nonfinite_losses.value.assign_add(ops.cast(bad, "float32"))
        return loss if self._unit_scale else super().scale_loss(loss)

    @property
    def _unit_scale(self) -> bool:
        """A fixed scale of 1 (the NaN guard under bf16 / float32): nothing to multiply or divide."""
        return not self.dynamic and self.initial_scale == 1.0

    # ------------------------------------------------------------------ apply

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError(
            "tfmp.DynamicLossScaleOptimizer supports the TensorFlow backend only "
            "(stateless_apply is for JAX)."
        )

    def apply(self, grads, trainable_variables=None) -> None:
        """Unscales `grads` (computed from `scale_loss(loss)`) and applies them."""
        self._apply(grads, trainable_variables, unscale=True)

    def apply_unscaled(self, grads, trainable_variables=None) -> None:
        """Applies gradients that were already divided by the scale.

        For custom loops that clip by hand: see `tfmp.get_unscaled_gradients`.
        Non-finite steps are skipped and back off the scale exactly as in `apply`.
        """
        self._apply(grads, trainable_variables, unscale=False)

    def _apply(self, grads, trainable_variables, unscale: bool) -> None:
        grads = list(grads)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        if unscale and not self._unit_scale:
            grads = self._unscale(grads, trainable_variables)
        # The decision is made on the *unscaled* gradients: a scale that reads 0
        # (or overflows the division) can never let a non-finite update through.
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            check_merge_call_free()
            ops.cond(
                self.check_finite(grads),
                lambda: self._finite_step(grads, trainable_variables),
                lambda: self._skip_step(self._first_nonfinite(grads, trainable_variables)),
            )
        else:
            tf.distribute.get_replica_context().merge_call(
                cross_replica_apply, args=(self, grads, trainable_variables)
            )

    def check_finite(self, grads) -> Any:
        """True if every gradient is finite: one sum per gradient, one test.

        NaN and inf propagate through a sum (+inf and -inf give NaN), so the
        sum of the gradients' sums is finite exactly when they are, up to a
        float32 sum overflowing (elements around 1e32 and above, a broken step
        in any precision). DeepSpeed checks overflow the same way; stock Keras
        builds a boolean tensor per gradient, which cost this check ~5% of a
        small model's step here. 16-bit gradients are summed in float32.
        """
        sums = [ops.sum(ops.cast(g, "float32") if g.dtype in (tf.float16, tf.bfloat16) else g)
                for g in grads if g is not None]
        if not sums:
            return ops.convert_to_tensor(True)
        return ops.isfinite(ops.sum(ops.stack(sums)))

    def _finite_step(self, grads, trainable_variables) -> None:
        update = update_step(self)  # read before the inner optimizer counts this step
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)
        self._after_finite_step(update)

    def _unscale(self, grads, trainable_variables):
        scale = self.dynamic_scale
        tvs = trainable_variables or self._trainable_variables
        return [
            g if g is None or self._overwrite_variable_with_gradient(v)
            else ops.divide(g, scale)
            for g, v in zip(grads, tvs)
        ]

    def _after_finite_step(self, update) -> None:
        """Growth bookkeeping after an applied micro-batch.

        `update` is True when the step updated the weights: under gradient
        accumulation `growth_interval` counts optimizer updates, not micro-batches.
        """
        counter = self.step_counter + ops.cast(update, self.step_counter.dtype)
        if not self.dynamic:
            self.step_counter.assign(counter)
            return
        grow = ops.logical_and(update, counter >= self.growth_interval)
        grown = ops.minimum(self.dynamic_scale * self.growth_factor, self.max_scale)
        self.dynamic_scale.assign(ops.where(grow, grown, self.dynamic_scale))
        self.step_counter.assign(ops.where(grow, 0, counter))
        self.hysteresis_left.assign(
            ops.where(grow, self.hysteresis, self.hysteresis_left)
        )

    def _first_nonfinite(self, grads, trainable_variables=None) -> tf.Tensor:
        """Index (in the built variable list) of the first non-finite gradient.

        Traced on the skip branch only. `len(built list)` means none here.
        """
        tvs = trainable_variables or self._trainable_variables
        bad = [
            ops.logical_not(ops.all(ops.isfinite(g))) if g is not None else False
            for g in grads
        ]
        # A trailing sentinel makes "no bad gradient here" the largest index.
        first = ops.argmax(ops.cast(ops.convert_to_tensor(bad + [True]), "int32"))
        positions = [self._get_variable_index(v) for v in tvs]
        positions.append(len(self._trainable_variables))
        return ops.take(ops.convert_to_tensor(positions, "int32"), first)

    def _skip_step(self, first_bad) -> None:
        """Counts a skipped step and backs off the scale (after hysteresis)."""
        self.skipped_steps.assign_add(1)
        steps = ops.cast(self.inner_optimizer._iterations, self.skipped_steps.dtype)
        self.last_skipped_step.assign(steps + self.skipped_steps)
        first_bad = ops.cast(first_bad, self.first_nonfinite_index.dtype)
        none_bad = first_bad >= len(self._trainable_variables)
        self.first_nonfinite_index.assign(ops.where(none_bad, -1, first_bad))
        self.step_counter.assign(0)
        if not self.dynamic:
            return
        left = self.hysteresis_left - 1
        backed_off = ops.maximum(self.dynamic_scale * self.backoff_factor, self.min_scale)
        self.dynamic_scale.assign(ops.where(left <= 0, backed_off, self.dynamic_scale))
        self.hysteresis_left.assign(ops.maximum(left, 0))

    # ---------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        """Stock Keras' config (`dynamic_growth_steps` is `growth_interval`) plus tfmp's."""
        config = super().get_config()
        config.update(
            growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
            hysteresis=self.hysteresis,
            dynamic=self.dynamic,
        )
        return config
