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
import tensorflow as tf
from keras import ops
from keras.src.utils import tracking  # the decorator Keras uses on LossScaleOptimizer.build

_INT = "int"


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    kind = "a positive integer" if integer else "a positive finite number"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be {kind}; got {name}={value!r}.")


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
    for name, value in (
        ("initial_scale", initial_scale),
        ("growth_factor", growth_factor),
        ("backoff_factor", backoff_factor),
        ("min_scale", min_scale),
        ("max_scale", max_scale),
    ):
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


@keras.saving.register_keras_serializable(package="tfmp")
class DynamicLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """A loss-scale optimizer with a floor, a ceiling, hysteresis and counters.

    On a step whose gradients are all finite, the gradients are divided by the
    scale and passed to the inner optimizer; after `growth_interval` such steps
    in a row the scale is multiplied by `growth_factor` (never above
    `max_scale`). On a step with any non-finite gradient (on any replica) no
    variable is updated, `skipped_steps` grows by one, and after `hysteresis`
    such steps the scale is multiplied by `backoff_factor` (never below
    `min_scale`). As in Megatron and DeepSpeed, once the hysteresis budget is
    used up every further overflow backs off until the scale next grows, which
    refills it.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` to wrap. Put
            `gradient_accumulation_steps`, `use_ema`, `weight_decay` and clipping
            on it.
        initial_scale: Starting loss scale.
        growth_factor: Multiplier (> 1) applied after `growth_interval` clean steps.
        backoff_factor: Multiplier in (0, 1) applied on overflow.
        growth_interval: Clean steps in a row before the scale grows.
        min_scale: The scale never goes below this (no collapse to 0).
        max_scale: The scale never goes above this.
        hysteresis: Non-finite steps tolerated before backing off (1 = back off
            on the first, like Keras and PyTorch).
        dynamic: If False the scale stays at `initial_scale`; non-finite steps
            are still skipped and counted (a NaN guard, for bf16 and float32
            use `initial_scale=1.0`).
        name: Optimizer name.

    Raises:
        ValueError: An argument is out of range; the message names it and its value.

    Example:
    >>> opt = tfmp.DynamicLossScaleOptimizer(keras.optimizers.Adam(), min_scale=1.0)
    >>> model.compile(optimizer=opt, loss="mse")  # compile() does not wrap it again
    >>> model.fit(x, y)
    >>> int(opt.skipped_steps), float(opt.dynamic_scale), opt.first_nonfinite_variable
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        initial_scale: float = 2.0**15,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        hysteresis: int = 1,
        dynamic: bool = True,
        name: Optional[str] = None,
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
        # the first apply() builds the optimizer (custom loops).
        with keras.name_scope(self.name, caller=self):
            # float32 and SUM: every replica's count is added up across replicas.
            self.nonfinite_losses = keras.Variable(
                0.0, name="nonfinite_losses", dtype="float32", trainable=False,
                aggregation="sum",
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

        `nonfinite_losses` counts (replica, step) pairs whose unscaled loss was
        NaN or inf: bad data or divergence, which no loss scale can fix.
        """
        bad = ops.logical_not(ops.all(ops.isfinite(loss)))
        # The tf.Variable's own assign_add all-reduces the increment under SUM
        # aggregation (keras.Variable.assign_add would sum the new values).
        self.nonfinite_losses.value.assign_add(ops.cast(bad, "float32"))
        return super().scale_loss(loss)

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
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            ops.cond(
                self.check_finite(grads),
                lambda: self._finite_step(grads, trainable_variables, unscale),
                lambda: self._skip_step(self._first_nonfinite(grads)),
            )
        else:
            tf.distribute.get_replica_context().merge_call(
                self._cross_replica_apply, args=(grads, trainable_variables, unscale)
            )

    def _finite_step(self, grads, trainable_variables, unscale: bool) -> None:
        self._apply_inner(grads, trainable_variables, unscale)
        self._after_finite_step()

    def _unscale(self, grads, trainable_variables):
        scale = self.dynamic_scale
        tvs = trainable_variables or self._trainable_variables
        return [
            g if g is None or self._overwrite_variable_with_gradient(v) else g / scale
            for g, v in zip(grads, tvs)
        ]

    def _apply_inner(self, grads, trainable_variables, unscale: bool) -> None:
        if unscale:
            grads = self._unscale(grads, trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def _after_finite_step(self) -> None:
        """Growth bookkeeping after an applied step."""
        if not self.dynamic:
            self.step_counter.assign_add(1)
            return
        grow = self.step_counter >= self.growth_interval - 1
        grown = ops.minimum(self.dynamic_scale * self.growth_factor, self.max_scale)
        self.dynamic_scale.assign(ops.where(grow, grown, self.dynamic_scale))
        self.step_counter.assign(ops.where(grow, 0, self.step_counter + 1))
        self.hysteresis_left.assign(
            ops.where(grow, self.hysteresis, self.hysteresis_left)
        )

    def _first_nonfinite(self, grads) -> tf.Tensor:
        """Index of the first non-finite gradient (only traced on the skip branch)."""
        bad = [
            ops.logical_not(ops.all(ops.isfinite(g))) if g is not None else False
            for g in grads
        ]
        # A trailing sentinel makes "no bad gradient here" index len(grads).
        bad = ops.cast(ops.convert_to_tensor(bad + [True]), "int32")
        return ops.cast(ops.argmax(bad), self.first_nonfinite_index.dtype)

    def _skip_step(self, first_bad) -> None:
        """Counts a skipped step and backs off the scale (after hysteresis)."""
        self.skipped_steps.assign_add(1)
        steps = ops.cast(self.inner_optimizer._iterations, self.skipped_steps.dtype)
        self.last_skipped_step.assign(steps + self.skipped_steps)
        none_bad = first_bad >= len(self._trainable_variables)
        self.first_nonfinite_index.assign(ops.where(none_bad, -1, first_bad))
        self.step_counter.assign(0)
        if not self.dynamic:
            return
        left = self.hysteresis_left - 1
        backed_off = ops.maximum(self.dynamic_scale * self.backoff_factor, self.min_scale)
        self.dynamic_scale.assign(ops.where(left <= 0, backed_off, self.dynamic_scale))
        self.hysteresis_left.assign(ops.maximum(left, 0))

    # ------------------------------------------------------ tf.distribute path

    def _cross_replica_apply(self, distribution, grads, trainable_variables, unscale):
        """Runs in cross-replica context (MirroredStrategy and friends).

        Overflow is all-reduced, so every replica skips when any replica saw a
        non-finite gradient; the branch is taken in cross-replica context
        because branches that call `merge_call` cannot live in a replica-context
        `cond`.
        """
        each = distribution.extended.call_for_each_replica
        bad = each(
            lambda g: ops.cast(ops.logical_not(self.check_finite(g)), "float32"),
            args=(grads,),
        )
        finite = ops.equal(
            distribution.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None), 0.0
        )

        def apply_fn():
            self._distributed_inner_apply(distribution, grads, trainable_variables, unscale)
            self._after_finite_step()

        def skip_fn():
            per_replica = each(self._first_nonfinite, args=(grads,))
            local = distribution.experimental_local_results(per_replica)
            self._skip_step(ops.min(ops.stack(local)))  # first over local replicas

        ops.cond(finite, apply_fn, skip_fn)

    def _distributed_inner_apply(self, distribution, grads, trainable_variables, unscale):
        each = distribution.extended.call_for_each_replica
        inner = self.inner_optimizer
        steps = inner.gradient_accumulation_steps
        if not steps:
            each(self._apply_inner, args=(grads, trainable_variables, unscale))
            return

        # Keras' accumulation puts merge_call inside a replica-context cond,
        # which MirroredStrategy rejects: take the branch here instead.
        def update():
            inner.gradient_accumulation_steps = None  # seen while tracing only
            try:
                each(self._apply_accumulated, args=(grads, trainable_variables, unscale, steps))
            finally:
                inner.gradient_accumulation_steps = steps

        def accumulate():
            each(self._accumulate, args=(grads, trainable_variables, unscale))

        ops.cond((inner._iterations + 1) % steps == 0, update, accumulate)

    def _accumulators(self, trainable_variables):
        inner = self.inner_optimizer
        tvs = trainable_variables or self._trainable_variables
        return [inner._accumulated_gradients[inner._get_variable_index(v)] for v in tvs]

    def _apply_accumulated(self, grads, trainable_variables, unscale, steps):
        if unscale:
            grads = self._unscale(grads, trainable_variables)
        accs = self._accumulators(trainable_variables)
        averaged = [None if g is None else (g + a) / steps for g, a in zip(grads, accs)]
        self.inner_optimizer.apply(averaged, trainable_variables=trainable_variables)
        self.inner_optimizer._backend_reset_gradient_accumulators()

    def _accumulate(self, grads, trainable_variables, unscale):
        if unscale:
            grads = self._unscale(grads, trainable_variables)
        pairs = [(g, a) for g, a in zip(grads, self._accumulators(trainable_variables))
                 if g is not None]
        self.inner_optimizer._backend_increment_gradient_accumulators(
            [g for g, _ in pairs], [a for _, a in pairs]
        )
        self.inner_optimizer._iterations.assign_add(1)

    # ---------------------------------------------------------------- config

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("dynamic_growth_steps")
        config.update(
            growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor,
            growth_interval=self.growth_interval,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
            hysteresis=self.hysteresis,
            dynamic=self.dynamic,
        )
        return config
