"""Keras 3 `model.fit` under a multi-worker strategy (keras-team/keras#20585).

Keras 3.15 fails there before the first step:
1. the model is built from one batch that Keras all-reduces eagerly, which a
   collective strategy cannot do: one local replica's batch is used instead (only
   its shapes and dtypes matter). Keras' own build is tried first, so this steps
   aside as soon as Keras stops failing;
2. the step's scalar logs are reduced along axis 0: the train and test steps
   return them with a leading axis of 1, which that reduction removes. Applied only
   when a probe of Keras' reduction shows the failure.
Only the model is changed (instance attributes); nothing outside a multi-worker
cluster, and nothing with `TFMP_MULTI_WORKER_FIX=off`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import keras
import tensorflow as tf
from keras import ops

from tfmp import _compat

FIX_ENV = "TFMP_MULTI_WORKER_FIX"  # "off": leave Keras as it is (to see upstream's failure)


def in_multi_worker_mode(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True under a MultiWorkerMirroredStrategy whose cluster has more than one worker.

    Args:
        strategy: The strategy (default: the current one).

    Returns:
        Whether `strategy` spans several workers.
    """
    return _compat.in_multi_worker_mode(strategy or tf.distribute.get_strategy())


def _local_value(value: Any, strategy: tf.distribute.Strategy) -> Any:
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _with_leading_axis(step):
    def wrapped(data):
        return keras.tree.map_structure(
            lambda t: ops.expand_dims(t, 0) if getattr(t, "shape", None) == () else t, step(data))

    return wrapped


def enable_multi_worker_fit(model: keras.Model,
                            strategy: Optional[tf.distribute.Strategy] = None) -> list[str]:
    """Lets Keras 3 `model.fit` / `evaluate` run under a multi-worker strategy.

    Args:
        model: A model built and compiled (or to be compiled) under `strategy`'s scope.
        strategy: The strategy (default: `model.distribute_strategy`).

    Returns:
        The names of the fixes applied (`symbolic_build`, `scalar_logs`; empty: none needed).

    Example:
    >>> with strategy.scope():
    ...     model, opt = tfmp.prepare(model, "adam", "bf16")   # calls this
    """
    strategy = strategy or model.distribute_strategy
    if not in_multi_worker_mode(strategy) or os.environ.get(FIX_ENV, "").lower() == "off":
        return []

    def build_from_local_batch(iterator) -> None:
        batch = keras.tree.map_structure(lambda v: _local_value(v, strategy),
                                         _compat.first_batch(iterator))
        with strategy.scope():
            _compat.symbolic_build(model, batch)

    _compat.wrap_symbolic_build(model, build_from_local_batch)
    applied = ["symbolic_build"]
    if _compat.keras_reduces_scalar_logs_along_axis_0():
        applied.append("scalar_logs")
        for name in ("train_step", "test_step"):
            _compat.wrap_step(model, name, _with_leading_axis)
    return applied
