"""Keras' TensorFlow backend and TensorFlow itself (the multi-worker workarounds of
keras-team/keras#20585, merge_call support), and LiteRT's interpreter."""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from tfmp._compat.base import KerasInternalsChanged, relying_on


def current_graph() -> Any:
    """The graph being built (in a `tf.function` trace: that trace's), whose ops so far
    `get_operations()` lists: TensorFlow's v1 `get_default_graph`, which TF2 has no other
    name for."""
    return tf.compat.v1.get_default_graph()


def supports_no_merge_call() -> bool:
    """`tf.__internal__.distribute.strategy_supports_no_merge_call()`: the current strategy
    runs updates without `merge_call` (all-GPU mirrored strategies inside XLA)."""
    with relying_on("tf.__internal__.distribute.strategy_supports_no_merge_call"):
        return bool(tf.__internal__.distribute.strategy_supports_no_merge_call())


def in_multi_worker_mode(strategy: Any) -> bool:
    """A MultiWorkerMirroredStrategy over a cluster of more than one worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    with relying_on("CollectiveAllReduceExtended._in_multi_worker_mode"):
        return bool(strategy.extended._in_multi_worker_mode())


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


def keras_reduces_scalar_logs_along_axis_0() -> bool:
    """Whether Keras' TensorFlow trainer reduces a scalar train-step log along axis 0 under
    several workers (the second failure of ISSUE_MULTI_WORKER_FIT), by probing
    `keras.src.backend.tensorflow.trainer.reduce_per_replica` with a recording strategy."""
    with relying_on("keras.src.backend.tensorflow.trainer.reduce_per_replica"):
        from keras.src.backend.tensorflow.trainer import reduce_per_replica

        probe = _ReduceProbe()
        reduce_per_replica({"loss": tf.constant(1.0)}, probe, reduction="auto")
    return any(axis == 0 and rank == 0 for _, axis, rank in probe.calls)


def wrap_symbolic_build(model: Any, build_from_local_batch: Callable[[Any], None]) -> None:
    """Makes `model`'s first-batch build fall back to `build_from_local_batch(iterator)`
    where Keras' own `_maybe_symbolic_build` fails on a per-replica batch (the first
    failure of ISSUE_MULTI_WORKER_FIT). Keras' own build is tried first."""
    with relying_on("TensorFlowTrainer._maybe_symbolic_build"):
        stock = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        try:
            return stock(iterator=iterator, data_batch=data_batch)
        except ValueError as e:
            if iterator is None or "PerReplica" not in str(e):
                raise
        build_from_local_batch(iterator)

    model._maybe_symbolic_build = maybe_symbolic_build


def symbolic_build(model: Any, data_batch: Any) -> None:
    """`model._symbolic_build(data_batch=...)`: builds model, optimizer and metrics from a batch."""
    with relying_on("Trainer._symbolic_build"):
        model._symbolic_build(data_batch=data_batch)


def first_batch(iterator: Any) -> Any:
    """The first batch of Keras' epoch iterator (what its symbolic build reads)."""
    with relying_on("TFEpochIterator (yields (begin, end, iterator))"):
        for _, _, it in iterator:
            return next(it)
    raise KerasInternalsChanged("Keras' epoch iterator yielded no batch to build the model from")


def interpreter_ops(interpreter: Any) -> list[dict[str, Any]]:
    """Every op of a LiteRT / tf.lite interpreter (`_get_ops_details()`: `op_name`,
    `inputs`, `outputs`), read before the first allocation (delegates replace ops then)."""
    with relying_on("Interpreter._get_ops_details"):
        return list(interpreter._get_ops_details())


def export_input_signature(model: Any) -> list[Any]:
    """The input signature Keras' own exports serve a model with
    (`keras.src.export.export_utils.get_input_signature`), as a list of positional
    arguments, as Keras' LiteRT exporter normalizes it."""
    with relying_on("keras.src.export.export_utils.get_input_signature"):
        from keras.src.export.export_utils import get_input_signature

        signature = get_input_signature(model)
    return list(signature) if isinstance(signature, (list, tuple)) else [signature]
