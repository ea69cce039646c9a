"""One skip-or-apply decision for every replica (TensorFlow's tf.distribute).

`DynamicLossScaleOptimizer.apply` ends in `decide_and_apply`:

- one device, or a strategy that runs updates without `merge_call`: a `cond` in
  replica context on `check_finite`, Keras' own `inner.apply()` on the applied branch;
- a strategy that uses `merge_call` (MirroredStrategy on CPUs and mixed devices,
  MultiWorkerMirroredStrategy): the decision is taken in cross-replica context
  (`cross_replica_apply`), because a replica-context `cond` whose branch calls
  `merge_call` is rejected. Every replica skips when any replica saw a non-finite
  gradient (stock Keras reads the first replica's flag only). The applied branch
  sums the gradients over the replicas first and then runs what Keras' single-device
  `apply()` runs on every replica (`tfmp._compat.apply_decided`), the
  accumulation and EMA-overwrite branches decided here too: stock Keras 3.15 puts
  `merge_call` inside replica-context `cond`s there and crashes
  (keras-team/keras#20582).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import tensorflow as tf
from keras import ops

from tfmp import _compat


class Decider(Protocol):
    """What the decision needs of a loss-scale optimizer (`DynamicLossScaleOptimizer` is one)."""

    inner_optimizer: Any

    def check_finite(self, grads: Sequence[Any]) -> Any:
        """True if every gradient is finite (replica context)."""

    def updates_weights(self) -> Any:
        """True when the next applied micro-batch updates the weights."""

    def first_nonfinite(self, grads: Sequence[Any], trainable_variables: Any = None) -> Any:
        """The built-list index of the first non-finite gradient (replica context)."""

    def record_applied(self, updated: Any) -> None:
        """Growth bookkeeping after an applied micro-batch."""

    def record_skip(self, first_bad: Any) -> None:
        """Counts a skipped step and backs off the scale."""


def replicas_in_sync() -> int:
    """Replicas of the current replica context (1 outside any strategy)."""
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


def any_replica(flag: Any) -> Any:
    """True on every replica if `flag` (a bool tensor) is true on any replica.

    Args:
        flag: A scalar bool tensor, in replica context.

    Returns:
        The all-reduced flag (`flag` itself with a single replica).
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


def decide_and_apply(optimizer: Decider, grads: Sequence[Any],
                     trainable_variables: Optional[Sequence[Any]]) -> None:
    """Applies unscaled `grads` through the inner optimizer, or skips the step everywhere.

    Args:
        optimizer: The loss-scale optimizer deciding.
        grads: Unscaled gradients (per replica under a strategy).
        trainable_variables: The variables, or None for the built list.

    Raises:
        ValueError: called in cross-replica context, or several replicas without
            `merge_call` (`check_merge_call_free`).
    """
    if tf.distribute.in_cross_replica_context():
        raise ValueError("apply() must be called in a replica context.")
    if _compat.supports_no_merge_call():
        check_merge_call_free()
        ops.cond(optimizer.check_finite(grads),
                 lambda: _apply_here(optimizer, grads, trainable_variables),
                 lambda: optimizer.record_skip(optimizer.first_nonfinite(grads, trainable_variables)))
    else:
        tf.distribute.get_replica_context().merge_call(
            cross_replica_apply, args=(optimizer, grads, trainable_variables))


def _apply_here(optimizer, grads, trainable_variables) -> None:
    updated = optimizer.updates_weights()  # read before the inner optimizer counts this step
    optimizer.inner_optimizer.apply(grads, trainable_variables=trainable_variables)
    optimizer.record_applied(updated)


def cross_replica_apply(distribution: tf.distribute.Strategy,
                        optimizer: Decider,
                        grads: Sequence[Any],
                        trainable_variables: Optional[Sequence[Any]]) -> None:
    """`merge_call` target: decide once for all replicas, then apply or skip.

    Args:
        distribution: The strategy (given by `merge_call`).
        optimizer: The loss-scale optimizer.
        grads: Per-replica unscaled gradients. Every replica skips when any
            replica saw a non-finite gradient.
        trainable_variables: The variables, or None for the built list.
    """
    each = distribution.extended.call_for_each_replica
    bad = each(lambda g: ops.cast(ops.logical_not(optimizer.check_finite(g)), "float32"),
               args=(grads,))
    finite = ops.equal(distribution.reduce(tf.distribute.ReduceOp.SUM, bad, axis=None), 0.0)

    def apply_fn():
        updated = optimizer.updates_weights()  # read before the inner optimizer counts this step
        apply_on_every_replica(distribution, optimizer.inner_optimizer, grads,
                               trainable_variables, updated)
        optimizer.record_applied(updated)

    def skip_fn():
        per_replica = each(optimizer.first_nonfinite, args=(grads, trainable_variables))
        local = distribution.experimental_local_results(per_replica)
        optimizer.record_skip(ops.min(ops.stack(local)))  # first over local replicas

    ops.cond(finite, apply_fn, skip_fn)


def apply_on_every_replica(distribution: tf.distribute.Strategy, inner: Any,
                           grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]],
                           updated: Any) -> None:
    """What `inner.apply(grads)` does on one device, done on every replica (cross-replica context).

    The gradients are summed over the replicas first, as Keras' own update step sums
    them, so that clipping, weight decay, accumulation, `overwrite_with_gradient` and
    `loss_scale_factor` see the global gradient, as on one device; then each replica
    runs `tfmp._compat.apply_decided` with the accumulation branch taken here.

    Args:
        distribution: The strategy.
        inner: The inner optimizer.
        grads: Per-replica gradients.
        trainable_variables: The variables, or None for the built list.
        updated: Whether this micro-batch updates the weights (True without accumulation).
    """
    each = distribution.extended.call_for_each_replica
    summed = each(_sum_over_replicas, args=(grads,))

    def run(update: bool) -> None:
        each(_compat.apply_decided, args=(inner, summed, trainable_variables, update))
        due = _compat.ema_overwrite_due(inner)
        if due is not False:
            ops.cond(due, lambda: _compat.overwrite_with_ema(inner), lambda: None)
        each(_compat.finish_apply, args=(inner, summed, trainable_variables))

    if inner.gradient_accumulation_steps:
        ops.cond(updated, lambda: run(True), lambda: run(False))
    else:
        run(True)


def _sum_over_replicas(grads: Sequence[Any]) -> list[Any]:
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    reduced = iter(tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in grads]
