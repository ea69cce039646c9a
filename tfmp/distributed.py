"""The distributed parts of loss scaling: one decision for every replica.

`DynamicLossScaleOptimizer` calls these under a `tf.distribute` strategy:

- `any_replica`: all-reduces a per-replica flag, so every replica takes the
  same skip / apply decision (stock Keras reads only the first replica's flag).
- `cross_replica_apply`: the `merge_call` path (MirroredStrategy on CPU and
  mixed devices): the branch is taken in cross-replica context, because a
  replica-context `cond` whose branch calls `merge_call` is rejected.
- The gradient accumulation workaround for that path (stock Keras 3.15 puts
  `merge_call` inside a replica-context `cond` and crashes).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import tensorflow as tf
from keras import ops

if TYPE_CHECKING:  # pragma: no cover
    from tfmp.loss_scale import DynamicLossScaleOptimizer


def replicas_in_sync() -> int:
    """Replicas of the current replica context (1 outside any strategy)."""
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


def any_replica(flag: Any) -> Any:
    """True on every replica if `flag` (a bool tensor) is true on any replica.

    Called in replica context; a no-op with a single replica.
    """
    if replicas_in_sync() <= 1:
        return flag
    total = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, ops.cast(flag, "float32"))
    return total > 0.0


def check_merge_call_free() -> None:
    """Refuses several replicas where TensorFlow turned `merge_call` off.

    That happens for MirroredStrategy / MultiWorkerMirroredStrategy over GPUs
    only, inside XLA (`jit_compile=True`). There a skip decision has to be
    taken in replica context, and a replica-context `cond` cannot hold the
    inner optimizer's update: its `iterations` (ONLY_FIRST_REPLICA) is
    updated through `merge_call` even then. Without this check each replica
    would decide on its own gradients, or fail deep inside TensorFlow.

    Raises:
        ValueError: more than one replica in sync on such a strategy.
    """
    replicas = replicas_in_sync()
    if replicas > 1:
        strategy = type(tf.distribute.get_strategy()).__name__
        raise ValueError(
            f"tfmp.DynamicLossScaleOptimizer cannot run on {strategy} over {replicas} replicas "
            "with merge_call turned off (all-GPU strategies inside XLA): every replica must "
            "take one skip decision and TensorFlow cannot update the optimizer inside that "
            "branch there. Compile without jit_compile=True, or use one replica."
        )


def update_step(optimizer: "DynamicLossScaleOptimizer") -> Any:
    """True when the next applied micro-batch updates the weights (accumulation)."""
    steps = optimizer.inner_optimizer.gradient_accumulation_steps
    if not steps:
        return True
    return ops.equal((optimizer.inner_optimizer._iterations + 1) % steps, 0)


def cross_replica_apply(distribution: tf.distribute.Strategy,
                        optimizer: "DynamicLossScaleOptimizer",
                        grads: Sequence[Any],
                        trainable_variables: Optional[Sequence[Any]]) -> None:
    """`merge_call` target: decide once for all replicas, then apply or skip.

    `grads` are per-replica (already unscaled). Every replica skips when any
    replica saw a non-finite gradient.
    """
    each = distribution.extended.call_for_each_replica
    bad = each(lambda g: ops.cast(ops.logical_not(optimizer.check_finite(g)), "float32"),
               args=(grads,))
    finite = ops.equal(distribution.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None), 0.0)

    def apply_fn():
        update = update_step(optimizer)  # read before the inner optimizer counts this step
        _distributed_inner_apply(distribution, optimizer, grads, trainable_variables)
        optimizer._after_finite_step(update)

    def skip_fn():
        per_replica = each(optimizer._first_nonfinite, args=(grads, trainable_variables))
        local = distribution.experimental_local_results(per_replica)
        optimizer._skip_step(ops.min(ops.stack(local)))  # first over local replicas

    ops.cond(finite, apply_fn, skip_fn)


def _distributed_inner_apply(distribution, optimizer, grads, trainable_variables) -> None:
    each = distribution.extended.call_for_each_replica
    inner = optimizer.inner_optimizer
    steps = inner.gradient_accumulation_steps
    if not steps:
        each(lambda g, v: inner.apply(g, trainable_variables=v), args=(grads, trainable_variables))
        return

    # Keras' accumulation puts merge_call inside a replica-context cond,
    # which MirroredStrategy rejects: take the branch here instead.
    def update():
        each(_apply_accumulated, args=(inner, grads, trainable_variables, steps))

    def accumulate():
        each(_accumulate, args=(inner, grads, trainable_variables))

    ops.cond(update_step(optimizer), update, accumulate)


def _accumulators(inner, trainable_variables):
    tvs = trainable_variables or inner._trainable_variables
    return [inner._accumulated_gradients[inner._get_variable_index(v)] for v in tvs]


def _apply_accumulated(inner, grads, trainable_variables, steps) -> None:
    """The update branch of Keras' own accumulation (`BaseOptimizer._backend_apply_gradients`),
    without its replica-context `cond`. Accumulation stays on meanwhile, so that
    `inner.iterations` counts updates, as Adam's bias correction and learning-rate
    schedules expect (it would count micro-batches with accumulation turned off)."""
    tvs = inner._trainable_variables if trainable_variables is None else trainable_variables
    pairs = [(g, v) for g, v in zip(grads, tvs) if g is not None]  # as apply() filters them
    grads, tvs = [g for g, _ in pairs], [v for _, v in pairs]
    accs = _accumulators(inner, tvs)
    averaged = inner._clip_gradients([(g + a) / steps for g, a in zip(grads, accs)])
    inner._apply_weight_decay(tvs)
    inner._backend_update_step(averaged, tvs, inner.learning_rate)
    inner._backend_reset_gradient_accumulators()
    if inner.use_ema:
        inner._update_model_variables_moving_average(inner._trainable_variables)
    inner._iterations.assign_add(1)


def _accumulate(inner, grads, trainable_variables) -> None:
    pairs = [(g, a) for g, a in zip(grads, _accumulators(inner, trainable_variables))
             if g is not None]
    inner._backend_increment_gradient_accumulators([g for g, _ in pairs],
                                                   [a for _, a in pairs])
    inner._iterations.assign_add(1)


# ------------------------------------------------------- multi-worker model.fit

FIX_ENV = "TFMP_MULTI_WORKER_FIX"  # "off": leave Keras as it is (to see upstream's failure)


def in_multi_worker_mode(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True under a MultiWorkerMirroredStrategy whose cluster has more than one worker."""
    strategy = strategy or tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


class _ReduceProbe(tf.distribute.MultiWorkerMirroredStrategy):
    """Stands in for a multi-worker strategy to see what Keras' log reduction asks of it.

    Never initialized: no cluster, no collective is touched; `reduce` only records.
    """

    def __init__(self) -> None:  # noqa: D107  (deliberately not calling the base class)
        self.calls: list[tuple[Any, Any, int]] = []

    @property
    def extended(self):
        return self

    def _in_multi_worker_mode(self) -> bool:
        return True

    def reduce(self, reduce_op, value, axis=None):
        self.calls.append((reduce_op, axis, value.shape.rank))
        return value


def keras_reduces_scalar_logs_along_axis_0() -> Optional[bool]:
    """Whether the installed Keras reduces a scalar train-step log along axis 0 under
    several workers (keras#20585's second failure). None if that cannot be probed."""
    try:
        from keras.src.backend.tensorflow.trainer import reduce_per_replica

        probe = _ReduceProbe()
        reduce_per_replica({"loss": tf.constant(1.0)}, probe, reduction="auto")
    except Exception:  # noqa: BLE001  (Keras' internals moved: nothing to patch against)
        return None
    return any(axis == 0 and rank == 0 for _, axis, rank in probe.calls)


def _local_value(value: Any, strategy: tf.distribute.Strategy) -> Any:
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def enable_multi_worker_fit(model: Any, strategy: Optional[tf.distribute.Strategy] = None,
                            ) -> list[str]:
    """Lets Keras 3 `model.fit` / `evaluate` run under a multi-worker strategy.

    Keras 3.15 fails there before the first step (keras-team/keras#20585):
    1. the model is built from one batch that Keras all-reduces eagerly, which a
       collective strategy cannot do: here one local replica's batch is used
       (only its shapes and dtypes matter). Keras' own build is tried first, so
       this steps aside as soon as Keras stops failing;
    2. the step's scalar logs are reduced along axis 0: here the train and test
       steps return them with a leading axis of 1, which that reduction removes.
       Applied only when a probe of Keras' reduction shows the failure.

    Only `model` is changed (instance attributes); nothing outside a multi-worker
    cluster, and nothing with `TFMP_MULTI_WORKER_FIX=off`.

    Returns:
        The names of the fixes applied (empty: none needed).
    """
    strategy = strategy or model.distribute_strategy
    if not in_multi_worker_mode(strategy) or os.environ.get(FIX_ENV, "").lower() == "off":
        return []
    import keras

    applied = ["symbolic_build"]
    stock_build = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        try:
            return stock_build(iterator=iterator, data_batch=data_batch)
        except ValueError as e:
            if iterator is None or "PerReplica" not in str(e):
                raise
        for _, _, it in iterator:
            batch = keras.tree.map_structure(lambda v: _local_value(v, strategy), next(it))
            break
        with strategy.scope():
            model._symbolic_build(data_batch=batch)

    model._maybe_symbolic_build = maybe_symbolic_build
    if keras_reduces_scalar_logs_along_axis_0():
        applied.append("scalar_logs")
        for name in ("train_step", "test_step"):
            model_step = getattr(model, name)

            def step(data, model_step=model_step):
                return keras.tree.map_structure(
                    lambda t: ops.expand_dims(t, 0) if getattr(t, "shape", None) == () else t,
                    model_step(data))

            setattr(model, name, step)
    return applied
