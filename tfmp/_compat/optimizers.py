"""Keras' optimizer internals: the pieces of `BaseOptimizer.apply()` that the distributed
path runs in Keras' order (keras-team/keras#20582)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import keras
import tensorflow as tf
from keras import ops

from tfmp._compat.base import relying_on

def build_scale_state(optimizer: Any) -> None:
    """What Keras' `LossScaleOptimizer.build` creates before it builds the inner optimizer:
    `step_counter` and `dynamic_scale`, in that order, as Keras 3.15 creates them (without a
    variable list: the scale exists before the variables the optimizer updates are known)."""
    with relying_on("LossScaleOptimizer.build's step_counter and dynamic_scale"):
        optimizer.step_counter = optimizer.add_variable(
            shape=(), dtype="int", initializer=keras.initializers.Zeros(), aggregation="none",
            name="step_counter")
        optimizer.dynamic_scale = optimizer.add_variable(
            shape=(), dtype="float32", initializer=keras.initializers.Constant(
                optimizer.initial_scale), aggregation="none", name="dynamic_scale")


def build_after_scale_state(optimizer: Any, var_list: Sequence[Any]) -> None:
    """The rest of `LossScaleOptimizer.build`: the inner optimizer, then Keras'
    `Optimizer.build` on the loss-scale optimizer itself."""
    with relying_on("LossScaleOptimizer.build's order (inner optimizer, then Optimizer.build)"):
        optimizer.inner_optimizer.build(var_list)
        super(keras.optimizers.LossScaleOptimizer, optimizer).build(var_list)


def micro_batches(optimizer: Any) -> Any:
    """`optimizer._iterations`: applied calls, micro-batches under gradient accumulation
    (`optimizer.iterations` counts updates there)."""
    with relying_on("BaseOptimizer._iterations"):
        return optimizer._iterations


def built_variables(optimizer: Any) -> list:
    """The trainable variables an optimizer was built with, in its order."""
    with relying_on("BaseOptimizer._trainable_variables"):
        return list(optimizer._trainable_variables)


def variable_index(optimizer: Any, variable: Any) -> int:
    """`optimizer._get_variable_index(variable)`: its position in the built list."""
    with relying_on("BaseOptimizer._get_variable_index"):
        return optimizer._get_variable_index(variable)


def overwrites_with_gradient(optimizer: Any, variable: Any) -> bool:
    """Whether `apply()` assigns this variable its gradient instead of updating it."""
    with relying_on("BaseOptimizer._overwrite_variable_with_gradient"):
        return bool(optimizer._overwrite_variable_with_gradient(variable))


def apply_decided(inner: Any, grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]],
                  update: bool) -> None:
    """Keras' `BaseOptimizer.apply()` on one replica, its accumulation branch decided.

    Under a `tf.distribute` strategy Keras 3.15 takes the accumulation branch
    (update, or add to the accumulators) in a replica-context `cond` whose update
    branch calls `merge_call`, which TensorFlow rejects (ISSUE_ACCUMULATION_UNDER_STRATEGY);
    its `ema_overwrite_frequency` branch does the same. tfmp decides both in
    cross-replica context and runs, on every replica, what `apply()` runs in that
    order: empty gradients filtered, `overwrite_with_gradient` variables,
    `loss_scale_factor`, then (`update`) the accumulated average, clipping, weight
    decay, the update step and the accumulators' reset, or (not `update`) the
    accumulators' increment, then the EMA. `finish_apply` does the rest (constraints,
    `iterations`), after `overwrite_with_ema_if_due`. Every step is Keras' own
    method; only the order is re-stated here (`BaseOptimizer.apply` and
    `_backend_apply_gradients`, Keras 3.15).

    `grads` must already be summed over the replicas (as Keras' own update step
    sums them), so that every replica computes exactly what one device would.
    """
    with relying_on("BaseOptimizer.apply's pieces (_filter_empty_gradients, "
                     "_overwrite_variables_directly_with_gradients, _clip_gradients, "
                     "_apply_weight_decay, _distributed_tf_update_step, _accumulated_gradients, "
                     "_backend_increment/reset_gradient_accumulators, "
                     "_update_model_variables_moving_average)"):
        tvs = (list(inner._trainable_variables) if trainable_variables is None
               else list(trainable_variables))
        with keras.name_scope(inner.name, caller=inner):
            grads, tvs = inner._filter_empty_gradients(list(grads), tvs)
            grads, tvs = inner._overwrite_variables_directly_with_gradients(grads, tvs)
            if not grads:
                return
            if inner.loss_scale_factor is not None:
                grads = [g / inner.loss_scale_factor for g in grads]
            steps = inner.gradient_accumulation_steps
            accumulators = ([inner._accumulated_gradients[inner._get_variable_index(v)]
                             for v in tvs] if steps else [])
            if update:
                if steps:
                    grads = [(g + a) / steps for g, a in zip(grads, accumulators)]
                grads = inner._clip_gradients(grads)
                inner._apply_weight_decay(tvs)
                _update_step_without_all_reduce(inner, grads, tvs)
                if steps:
                    inner._backend_reset_gradient_accumulators()
            else:
                inner._backend_increment_gradient_accumulators(grads, accumulators)
            if inner.use_ema:
                inner._update_model_variables_moving_average(inner._trainable_variables)


def _update_step_without_all_reduce(inner: Any, grads: list, tvs: list) -> None:
    """`TFOptimizer._backend_update_step` minus its all-reduce (the gradients are summed)."""
    variables = [v.value if isinstance(v, keras.Variable) else v for v in tvs]
    tf.__internal__.distribute.interim.maybe_merge_call(
        inner._distributed_tf_update_step, inner._distribution_strategy,
        list(zip(grads, variables)), inner.learning_rate)


def ema_overwrite_due(inner: Any) -> Any:
    """Whether `apply()` would overwrite the model's variables with their EMA now."""
    if not (inner.use_ema and inner.ema_overwrite_frequency):
        return False
    return ops.equal((inner.iterations + 1) % inner.ema_overwrite_frequency, 0)


def overwrite_with_ema(inner: Any) -> None:
    """`_overwrite_model_variables_with_average_value` (cross-replica context under a strategy)."""
    with relying_on("BaseOptimizer._overwrite_model_variables_with_average_value"):
        inner._overwrite_model_variables_with_average_value(inner._trainable_variables)


def finish_apply(inner: Any, grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]],
                 ) -> None:
    """The end of `apply()`: variable constraints (on the variables that were updated),
    then one more applied call counted."""
    with relying_on("BaseOptimizer._trainable_variables / _iterations"):
        tvs = (list(inner._trainable_variables) if trainable_variables is None
               else list(trainable_variables))
        updated = [v for g, v in zip(grads, tvs)
                   if g is not None and not overwrites_with_gradient(inner, v)]
        for variable in updated:
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
        inner._iterations.assign_add(1)


class ViewedUpdates:
    """A mixin that lets an optimizer's `update_step` run on a stand-in for a variable.

    `tfmp.compensation` hands Keras' `update_step` a float32 tensor in place of a
    16-bit variable. Keras finds a variable's slots by `_var_key` (its private key);
    this mixin keys a stand-in by the variable it stands for (`view_owner`), leaves
    out of Keras' own weight decay (`_apply_weight_decay`, which writes the variable
    directly) the variables whose decay the subclass applies itself (`decays_itself`),
    keeps EMA averages in their own dtype (`_update_model_variables_moving_average`)
    and casts float32 ones to their variables' dtype before Keras writes them into the
    variables (`_overwrite_model_variables_with_average_value`). All are
    `BaseOptimizer`/`TFOptimizer` internals (Keras 3.15).
    """

    def view_owner(self, variable: Any) -> Any:
        """The variable `variable` stands for, or None if it is no stand-in."""
        return None

    def decays_itself(self, variable: Any) -> bool:
        """True if the subclass applies `variable`'s weight decay in its update."""
        return False

    def _var_key(self, variable):
        with relying_on("TFOptimizer._var_key"):
            owner = self.view_owner(variable)
            return super()._var_key(variable if owner is None else owner)

    def _apply_weight_decay(self, variables):
        with relying_on("BaseOptimizer._apply_weight_decay"):
            return super()._apply_weight_decay(
                [v for v in variables if not self.decays_itself(v)])

    def _update_model_variables_moving_average(self, trainable_variables):
        # Keras computes the momentum in the variable's dtype: in bfloat16 0.999 is 1.0 and
        # the average never moves. Here it is computed in the average's dtype (float32 for
        # 16-bit variables in `tfmp.compensation`; the variable's own otherwise, as Keras).
        with relying_on("BaseOptimizer._model_variables_moving_average"):
            if not self.use_ema:
                return
            for var, average in zip(trainable_variables, self._model_variables_moving_average):
                if average is None:
                    continue
                momentum = ops.multiply(
                    ops.cast(ops.not_equal(self.iterations, 0), average.dtype), self.ema_momentum)
                average.assign(ops.add(ops.multiply(momentum, average), ops.multiply(
                    ops.subtract(1, momentum), ops.cast(var, average.dtype))))

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        # EMA averages are float32 (`tfmp.compensation`); TensorFlow's assign of one to a
        # 16-bit variable does not cast: Keras' method runs on averages cast to the variables'.
        with relying_on("BaseOptimizer._model_variables_moving_average"):
            kept = self._model_variables_moving_average
            cast = [a if a is None or a.dtype == v.dtype else ops.cast(a, v.dtype)
                    for v, a in zip(trainable_variables, kept)]
            object.__setattr__(self, "_model_variables_moving_average", cast)
            try:
                return super()._overwrite_model_variables_with_average_value(trainable_variables)
            finally:
                object.__setattr__(self, "_model_variables_moving_average", kept)


def uses_weight_decay(optimizer: Any, variable: Any) -> bool:
    """Whether Keras would decay `variable` (`BaseOptimizer._use_weight_decay`)."""
    if optimizer.weight_decay is None:
        return False
    with relying_on("BaseOptimizer._use_weight_decay"):
        return bool(optimizer._use_weight_decay(variable))



@contextlib.contextmanager
def reading_dtype(reference: Any, dtype: str) -> Iterator[None]:
    """Makes `reference.dtype` read `dtype` for a moment: Keras'
    `add_variable_from_reference` then creates the slot (its name, shape, layout and
    placement, as Keras gives them) in `dtype` instead of the reference's
    (`KerasVariable._dtype`, read by the `dtype` property, Keras 3.15)."""
    with relying_on("KerasVariable._dtype (read by add_variable_from_reference)"):
        kept = reference._dtype
        reference._dtype = dtype
    try:
        yield
    finally:
        reference._dtype = kept


def applies_own_weight_decay(optimizer: Any) -> bool:
    """Whether the optimizer's class overrides Keras' `_apply_weight_decay` (Muon does)."""
    with relying_on("TFOptimizer._apply_weight_decay"):
        return type(optimizer)._apply_weight_decay is not (
            keras.optimizers.Optimizer._apply_weight_decay)


def learning_rate_schedule(optimizer: Any) -> Any:
    """The optimizer's `LearningRateSchedule` object (`BaseOptimizer._learning_rate`; the
    public `learning_rate` is its value at the current step), or None for a fixed rate."""
    with relying_on("BaseOptimizer._learning_rate"):
        rate = optimizer._learning_rate
    return rate if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) else None
