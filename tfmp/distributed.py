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
        inner.gradient_accumulation_steps = None  # seen while tracing only
        try:
            each(_apply_accumulated, args=(inner, grads, trainable_variables, steps))
        finally:
            inner.gradient_accumulation_steps = steps

    def accumulate():
        each(_accumulate, args=(inner, grads, trainable_variables))

    ops.cond(update_step(optimizer), update, accumulate)


def _accumulators(inner, trainable_variables):
    tvs = trainable_variables or inner._trainable_variables
    return [inner._accumulated_gradients[inner._get_variable_index(v)] for v in tvs]


def _apply_accumulated(inner, grads, trainable_variables, steps) -> None:
    accs = _accumulators(inner, trainable_variables)
    averaged = [None if g is None else (g + a) / steps for g, a in zip(grads, accs)]
    inner.apply(averaged, trainable_variables=trainable_variables)
    inner._backend_reset_gradient_accumulators()


def _accumulate(inner, grads, trainable_variables) -> None:
    pairs = [(g, a) for g, a in zip(grads, _accumulators(inner, trainable_variables))
             if g is not None]
    inner._backend_increment_gradient_accumulators([g for g, _ in pairs],
                                                   [a for _, a in pairs])
    inner._iterations.assign_add(1)
