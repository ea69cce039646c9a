"""`DynamicLossScaleOptimizer`: Keras' LossScaleOptimizer that cannot fail silently.

Compared with `keras.optimizers.LossScaleOptimizer` it adds a floor and a
ceiling on the scale, configurable growth and backoff, hysteresis, a fixed
(`dynamic=False`) mode that doubles as a NaN guard, counters of skipped steps
saved with the optimizer, distribution-safe skipping (every replica skips when
any replica overflows) and gradient accumulation under `MirroredStrategy`.

The scale's rules are `keras.ops` functions (`tfmp.scaling.numerics`); the one
decision for every replica is `tfmp.scaling.replicas` (TensorFlow's tf.distribute).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import keras
from absl import logging
from keras import ops

from tfmp import _compat
from tfmp.compensation import CompensatedOptimizer
from tfmp.scaling import numerics, replicas
from tfmp.scaling.arguments import (DEFAULT_GROWTH_INTERVAL, DEFAULT_INITIAL_SCALE, ScaleRule,
                                    check_scale, default_scale_bounds, one_of,
                                    validate_scale_args)
from tfmp.scaling.building import can_build_outside_the_trace, outside_the_trace

_INT = "int"


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
            on it. Its `loss_scale_factor`, if any, is set to None (as Keras does;
            a warning says so): this optimizer's own scale is the one used.
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
        growth_interval = one_of("growth_interval", growth_interval, "dynamic_growth_steps",
                                  dynamic_growth_steps, DEFAULT_GROWTH_INTERVAL)
        check_scale("initial_scale", initial_scale)
        min_scale, max_scale = default_scale_bounds(initial_scale, min_scale, max_scale)
        validate_scale_args(
            initial_scale, growth_factor, backoff_factor, growth_interval,
            min_scale, max_scale, hysteresis,
        )
        factor = inner_optimizer.loss_scale_factor
        super().__init__(  # sets the inner optimizer's loss_scale_factor to None
            inner_optimizer,
            initial_scale=float(initial_scale),
            dynamic_growth_steps=int(growth_interval),
            name=name,
            **kwargs,
        )
        if factor is not None:  # Keras turns it off without a word
            logging.warning(
                "tfmp: the inner optimizer's loss_scale_factor=%r is not used (turned off, as "
                "Keras' LossScaleOptimizer does: the loss would be scaled twice); the loss "
                "scale starts at initial_scale=%r. For a fixed scale of %r pass "
                "initial_scale=%r, dynamic=False, or use tfmp.wrap_optimizer(), which converts it.",
                factor, initial_scale, factor, factor)
        self.rule = ScaleRule(float(growth_factor), float(backoff_factor), int(growth_interval),
                              float(min_scale), float(max_scale), int(hysteresis), dynamic)
        # Created here rather than in build(): scale_loss() may be traced before
        # the first apply() builds the optimizer (custom loops). Counts steps:
        # the flag is all-reduced, and only the first replica's update is kept.
        with keras.name_scope(self.name, caller=self):
            self.nonfinite_losses = keras.Variable(
                0.0, name="nonfinite_losses", dtype="float32", trainable=False,
                aggregation="only_first_replica",
            )

    @_compat.no_automatic_dependency_tracking
    def build(self, var_list: Sequence[keras.Variable]) -> None:
        """Creates the counters, the scale, and the inner optimizer's variables.

        Built by Keras inside the first traced train step (no strategy set), the
        variables are created out of the trace (`tfmp.scaling.building.outside_the_trace`):
        TensorFlow then traces the step once instead of twice, with the same variables.

        Args:
            var_list: The variables the optimizer updates.
        """
        with outside_the_trace():
            self._build_scale_state()
            _compat.build_after_scale_state(self, var_list)

    @_compat.no_automatic_dependency_tracking
    def _build_scale_state(self) -> None:
        """The counters and the scale (once): what `scale_loss` reads, known before the
        variables the optimizer updates are."""
        if getattr(self, "_scale_state_built", False):
            return

        def counter(name: str, value: int) -> keras.Variable:
            return self.add_variable(
                shape=(), dtype=_INT, aggregation="none", name=name,
                initializer=keras.initializers.Constant(value),
            )

        self.skipped_steps = counter("skipped_steps", 0)
        self.last_skipped_step = counter("last_skipped_step", 0)
        self.first_nonfinite_index = counter("first_nonfinite_index", -1)
        self.hysteresis_left = counter("hysteresis_left", self.hysteresis)
        _compat.build_scale_state(self)
        self._scale_state_built = True

    # ------------------------------------------------------------------ state

    growth_factor = property(lambda self: self.rule.growth_factor, doc="Growth multiplier.")
    backoff_factor = property(lambda self: self.rule.backoff_factor, doc="Back-off multiplier.")
    min_scale = property(lambda self: self.rule.min_scale, doc="The scale's floor.")
    max_scale = property(lambda self: self.rule.max_scale, doc="The scale's ceiling.")
    hysteresis = property(lambda self: self.rule.hysteresis, doc="Overflows before backing off.")
    dynamic = property(lambda self: self.rule.dynamic, doc="False: a fixed scale.")

    @property
    def growth_interval(self) -> int:
        """Clean optimizer updates in a row before the scale grows."""
        return self.rule.growth_interval

    @growth_interval.setter
    def growth_interval(self, value: int) -> None:
        validate_scale_args(self.initial_scale, self.growth_factor, self.backoff_factor, value,
                            self.min_scale, self.max_scale, self.hysteresis)
        self.rule = dataclasses.replace(self.rule, growth_interval=int(value))
        self.dynamic_growth_steps = int(value)  # stock Keras' name, saved in the config

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
        variables = _compat.built_variables(self)
        return variables[index].path if 0 <= index < len(variables) else None

    def scale_loss(self, loss):
        """Multiplies `loss` by the scale; counts non-finite losses in `nonfinite_losses`.

        `nonfinite_losses` counts steps whose unscaled loss was NaN or inf on
        any replica: bad data or divergence, which no loss scale can fix.

        Args:
            loss: The unscaled loss tensor.

        Returns:
            `loss` times the current scale (`loss` itself under a fixed scale of 1).
        """
        bad = replicas.any_replica(ops.logical_not(ops.all(ops.isfinite(loss))))
        # ONLY_FIRST_REPLICA: every replica adds the same all-reduced flag once.
        self.nonfinite_losses.value.assign_add(ops.cast(bad, "float32"))
        if self._unit_scale:
            return loss
        if not self.built and can_build_outside_the_trace():
            # The step is traced once (see `build`): it must read the scale variable, not
            # the initial scale Keras reads before the optimizer is built.
            with outside_the_trace():
                self._build_scale_state()
        return ops.multiply(loss, self.current_scale())

    def current_scale(self) -> Any:
        """What `scale_loss` multiplies by, and unscaling must divide by: the `dynamic_scale`
        variable once it exists (it may, in a traced step, before `built`), else `initial_scale`.

        Returns:
            The scale variable, or the initial scale as a Python float.
        """
        return self.dynamic_scale if getattr(self, "_scale_state_built", False) else (
            self.initial_scale)

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
        """Unscales `grads` (computed from `scale_loss(loss)`) and applies them, or skips.

        Args:
            grads: Gradients of the scaled loss, one per variable.
            trainable_variables: The variables (default: those the optimizer was built with).
        """
        self._apply(grads, trainable_variables, unscale=True)

    def apply_unscaled(self, grads, trainable_variables=None) -> None:
        """Applies gradients that were already divided by the scale.

        For custom loops that clip by hand: see `tfmp.get_unscaled_gradients`.
        Non-finite steps are skipped and back off the scale exactly as in `apply`.

        Args:
            grads: Unscaled gradients, one per variable.
            trainable_variables: The variables (default: those the optimizer was built with).
        """
        self._apply(grads, trainable_variables, unscale=False)

    def _apply(self, grads, trainable_variables, unscale: bool) -> None:
        grads = list(grads)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        if unscale and not self._unit_scale:
            grads = self._unscale(grads, trainable_variables)
        if isinstance(self.inner_optimizer, CompensatedOptimizer):  # before any all-reduce
            grads = self.inner_optimizer.gradients_for_apply(grads)
        # The decision is made on the *unscaled* gradients: a scale that reads 0
        # (or overflows the division) can never let a non-finite update through.
        replicas.decide_and_apply(self, grads, trainable_variables)

    def _unscale(self, grads, trainable_variables):
        scale = self.dynamic_scale
        tvs = trainable_variables or _compat.built_variables(self)
        return [
            g if g is None or _compat.overwrites_with_gradient(self, v)
            else ops.divide(g, scale)
            for g, v in zip(grads, tvs)
        ]

    # The steps of one decision, called by tfmp.scaling.replicas on one device or
    # on every replica (each in the context its comment names).

    def check_finite(self, grads) -> Any:
        """True if every gradient is finite (`tfmp.scaling.numerics.all_finite`).

        Args:
            grads: Gradient tensors; None entries are ignored.

        Returns:
            A scalar bool tensor.
        """
        return numerics.all_finite(grads)

    def updates_weights(self) -> Any:
        """True when the next applied micro-batch updates the weights (gradient accumulation:
        every N-th does). Read before the inner optimizer counts the micro-batch."""
        steps = self.inner_optimizer.gradient_accumulation_steps
        if not steps:
            return True
        return ops.equal((_compat.micro_batches(self.inner_optimizer) + 1) % steps, 0)

    def first_nonfinite(self, grads, trainable_variables=None) -> Any:
        """Index (in the built variable list) of the first non-finite gradient; the list's
        length if none is. Traced on the skip branch only (replica context)."""
        built = _compat.built_variables(self)
        tvs = trainable_variables or built
        positions = [_compat.variable_index(self, v) for v in tvs]
        return numerics.first_nonfinite(grads, positions, len(built))

    def record_applied(self, updated) -> None:
        """Growth bookkeeping after an applied micro-batch (cross-replica context under a
        strategy). `updated`: whether it updated the weights (`updates_weights()`)."""
        scale, counter, left = numerics.after_applied(
            self.rule, self.dynamic_scale, self.step_counter, self.hysteresis_left, updated)
        self.step_counter.assign(counter)
        if self.dynamic:
            self.dynamic_scale.assign(scale)
            self.hysteresis_left.assign(left)

    def record_skip(self, first_bad) -> None:
        """Counts a skipped step, records where, and backs off the scale (after hysteresis).

        Args:
            first_bad: `first_nonfinite(...)` of the step (the smallest over replicas).
        """
        self.skipped_steps.assign_add(1)
        steps = ops.cast(_compat.micro_batches(self.inner_optimizer), self.skipped_steps.dtype)
        self.last_skipped_step.assign(steps + self.skipped_steps)
        first_bad = ops.cast(first_bad, self.first_nonfinite_index.dtype)
        none_bad = first_bad >= len(_compat.built_variables(self))
        self.first_nonfinite_index.assign(ops.where(none_bad, -1, first_bad))
        self.step_counter.assign(0)
        scale, left = numerics.after_skipped(self.rule, self.dynamic_scale, self.hysteresis_left)
        if self.dynamic:
            self.dynamic_scale.assign(scale)
            self.hysteresis_left.assign(left)

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
