"""The layer a bad step went non-finite in: the batch kept on a skipped step, run again.

`keep_bad_batches(model)` wraps the model's train step so that, on a step the
loss-scale optimizer skips (a non-finite loss or gradient), the batch is copied to
the host. Only then: a `tf.cond` on the skip decision the step makes anyway, so a
clean step costs one untaken branch. `find_culprit` runs that batch through the
model again, every op checked (`tfmp.rewrite.replay.OriginFinder`), and names
the first layer, in model order, that made inf/NaN from finite inputs (else the first
whose output was not finite); then once more in float32 with the same weights
(`tfmp.rewrite.replay`), which tells a precision problem (finite in float32) from
divergence (non-finite in float32 too). All of it only when an event is diagnosed.

TensorFlow-only (`tf.py_function`); not under XLA (`jit_compile=True`) or on a TPU,
where a host callback cannot run inside the step: there nothing is kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import ops

from tfmp import _compat
from tfmp._messages import first_line
from tfmp.rewrite.replay import Float32Replay, OriginFinder, replay_in_float32
from tfmp.scaling import DynamicLossScaleOptimizer

_KEEPER = "_tfmp_bad_batch_keeper"


@dataclasses.dataclass(frozen=True)
class Culprit:
    """Where a bad batch went non-finite.

    Attributes:
        layer: The first layer, in model order, one of whose ops made inf/NaN from
            finite inputs, else the first whose output was not finite (None: neither,
            bad data, or nothing could be checked).
        origins: Every such layer, in model order.
        bad_inputs: The batch itself held inf/NaN (bad data, no layer to blame).
        float32: The same batch run in float32 with the same weights (None: bad data,
            or the replay itself failed).
        largest_weight: `(variable path, largest absolute value)` over the trainable
            weights as they are now (None: no finite weight).
        nonfinite_weights: The trainable weights that hold inf/NaN.
    """

    layer: Optional[str]
    origins: tuple[str, ...]
    bad_inputs: bool
    float32: Optional[Float32Replay] = None
    largest_weight: Optional[tuple[str, float]] = None
    nonfinite_weights: tuple[str, ...] = ()


def weight_sizes(model: keras.Model) -> tuple[Optional[tuple[str, float]], tuple[str, ...]]:
    """`(largest, nonfinite)`: the trainable weight with the largest finite absolute value
    and that value (None when there is none), and the paths of those holding inf/NaN."""
    largest, nonfinite = None, []
    for variable in model.trainable_variables:
        values = np.abs(np.asarray(variable.numpy(), dtype=np.float64))
        finite = np.isfinite(values)
        if not finite.all():
            nonfinite.append(variable.path)
        if finite.any():
            size = float(values[finite].max())
            if largest is None or size > largest[1]:
                largest = (variable.path, size)
    return largest, tuple(nonfinite)


class _Keeper:
    """Holds the batch of the last skipped step (host copies): under a strategy with several
    local replicas, each replica's shard, put back together when read."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple[int, Any]] = {}  # replica -> (skipped_steps then, shard)
        self.finder: Optional[OriginFinder] = None  # made at the first event, then reused

    def keep(self, structure: Any, replica: Any, skipped: Any, *arrays: Any) -> Any:
        self.shards[int(replica)] = (int(skipped), keras.tree.pack_sequence_as(
            structure, [np.array(a) for a in arrays]))
        return tf.constant(True)

    @property
    def batch(self) -> Optional[Any]:
        """The last skipped step's batch: every local replica's shard, in replica order."""
        if not self.shards:
            return None
        last = max(skipped for skipped, _ in self.shards.values())
        shards = [shard for _, (skipped, shard) in sorted(self.shards.items()) if skipped == last]
        if len(shards) == 1:
            return shards[0]
        return keras.tree.map_structure(lambda *a: np.concatenate(a), *shards)

    def wrapper(self, model: keras.Model):
        def wrap(original):
            def train_step(data: Any) -> Any:
                optimizer = getattr(model, "optimizer", None)
                if not isinstance(optimizer, DynamicLossScaleOptimizer) or not optimizer.built:
                    return original(data)
                if model.jit_compile or isinstance(tf.distribute.get_strategy(),
                                                   tf.distribute.TPUStrategy):
                    logging.info("tfmp: under XLA or on a TPU a bad step's batch cannot be kept: "
                                 "NanMonitor's events name the first non-finite variable only")
                    return original(data)
                before = ops.copy(optimizer.skipped_steps.value)
                logs = original(data)
                replica = tf.convert_to_tensor(
                    tf.distribute.get_replica_context().replica_id_in_sync_group)
                flat = [replica, optimizer.skipped_steps.value, *keras.tree.flatten(data)]
                tf.cond(optimizer.skipped_steps > before,
                        lambda: tf.py_function(lambda *a: self.keep(data, *a), flat, tf.bool),
                        lambda: tf.constant(False))
                return logs

            return train_step

        return wrap


def not_kept_because(model: keras.Model) -> Optional[str]:
    """Why no batch of a bad step is kept for `model` (one clause), or None: one is."""
    if last_bad_batch(model) is not None:
        return None
    if not isinstance(getattr(model, "optimizer", None), DynamicLossScaleOptimizer):
        return ("the optimizer is not tfmp's loss-scale optimizer, which keeps it "
                "(tfmp.prepare(..., guard=True) or tfmp.wrap_optimizer(..., guard=True))")
    if getattr(model, _KEEPER, None) is None:
        return "NanMonitor was not attached to the model"
    return "under XLA or on a TPU it cannot be kept"


def keep_bad_batches(model: keras.Model) -> None:
    """Makes `model`'s train step keep (on the host) the batch of a step the loss-scale
    optimizer skips. Idempotent; see the module's docstring for where it is off.

    Args:
        model: A Keras model compiled (or to be compiled) with a
            `tfmp.DynamicLossScaleOptimizer`.
    """
    if getattr(model, _KEEPER, None) is not None:
        return
    keeper = _Keeper()
    _compat.wrap_step(model, "train_step", keeper.wrapper(model))
    setattr(model, _KEEPER, keeper)


def last_bad_batch(model: keras.Model) -> Optional[Any]:
    """The batch of the last skipped step `keep_bad_batches` kept, or None."""
    keeper = getattr(model, _KEEPER, None)
    return None if keeper is None else keeper.batch


def _could_not(what: str, e: Exception) -> None:
    logging.warning("tfmp: could not %s (%s: %s)", what, type(e).__name__, first_line(e))


def find_culprit(model: keras.Model, *, gradients: bool = False) -> Optional[Culprit]:
    """Runs the last kept bad batch through `model` again, as it is and in float32, and
    says where it went non-finite.

    Args:
        model: A model `keep_bad_batches` was called on.
        gradients: The float32 run computes the gradients too (the event was about
            gradients, not the loss).

    Returns:
        A `Culprit`, or None when no batch was kept or the check itself failed (logged).
    """
    keeper = getattr(model, _KEEPER, None)
    batch = None if keeper is None else keeper.batch
    if batch is None:
        return None
    try:
        keeper.finder = keeper.finder or OriginFinder(model)
        origins, outputs, bad_inputs = keeper.finder(batch)
    except Exception as e:  # noqa: BLE001 (a diagnosis must not end the training it explains)
        _could_not("check which layer went non-finite", e)
        return None
    # No op made it from finite values (a layer's own code, a custom gradient): the first
    # layer whose output was not finite.
    first = origins[0] if origins else (outputs[0] if outputs and not bad_inputs else None)
    if bad_inputs:
        return Culprit(first, tuple(origins), bad_inputs)
    float32 = None
    try:
        float32 = replay_in_float32(model, batch, gradients=gradients)
    except Exception as e:  # noqa: BLE001
        _could_not("run the bad batch again in float32", e)
    return Culprit(first, tuple(origins), bad_inputs, float32, *weight_sizes(model))
