"""Every use tfmp makes of Keras', TensorFlow's and LiteRT's private APIs, behind one fence.

Nothing else in tfmp touches a `keras.src` module, an underscore attribute of a
Keras or TensorFlow object, or a method Keras calls on itself. Each function here
names the internal it relies on, the Keras version it was checked against
(`CHECKED_WITH`) and, where it works around a Keras bug, the upstream issue;
`tests/test_compat.py` exercises each one on the installed Keras and fails naming
the version when the internal is gone or behaves otherwise. An internal that has
disappeared raises `KerasInternalsChanged` (never an AttributeError from deep
inside a train step, never a silent fallback).

Sections: Keras (any backend), then Keras' TensorFlow backend and TensorFlow,
then LiteRT.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import keras
import tensorflow as tf
from keras import ops

CHECKED_WITH = "3.15.1"  # the Keras release every internal below was read from

ISSUE_MULTI_WORKER_FIT = "https://github.com/keras-team/keras/issues/20585"
ISSUE_ACCUMULATION_UNDER_STRATEGY = (
    "https://github.com/keras-team/keras/issues/20582 (PR https://github.com/keras-team/keras/pull/23592)")


class KerasInternalsChanged(RuntimeError):
    """A Keras (or TensorFlow) internal tfmp relies on is not what it was."""


def _changed(what: str, error: BaseException) -> KerasInternalsChanged:
    return KerasInternalsChanged(
        f"tfmp relies on {what}, which Keras {keras.__version__} (TensorFlow {tf.__version__}) "
        f"does not provide as Keras {CHECKED_WITH} did ({type(error).__name__}: {error}); "
        "please report it with these versions")


@contextlib.contextmanager
def _relying_on(what: str) -> Iterator[None]:
    try:
        yield
    except (AttributeError, ImportError) as e:
        raise _changed(what, e) from None


# ------------------------------------------------------------------ Keras, any backend

def _tracking_decorator() -> Callable:
    with _relying_on("keras.src.utils.tracking.no_automatic_dependency_tracking"):
        from keras.src.utils import tracking

        return tracking.no_automatic_dependency_tracking


# The decorator Keras puts on LossScaleOptimizer.build: variables made there are not
# tracked twice.
no_automatic_dependency_tracking = _tracking_decorator()


def flatten_layers(layer: Any, include_self: bool = False,
                   recursive: bool = True) -> list:
    """`layer._flatten_layers(...)`: its sublayers, nested models included, each once."""
    with _relying_on("Layer._flatten_layers"):
        return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def own_variables(layer: Any) -> list:
    """The variables a layer itself owns (`_trainable_variables + _non_trainable_variables`),
    not those of its sublayers."""
    with _relying_on("Layer._trainable_variables / Layer._non_trainable_variables"):
        return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def own_non_trainable_variables(layer: Any) -> list:
    """`layer._non_trainable_variables`: BatchNormalization's moving statistics and the like."""
    with _relying_on("Layer._non_trainable_variables"):
        return list(layer._non_trainable_variables)


def producer(tensor: Any) -> Any:
    """The layer or operation that produced a symbolic tensor (`_keras_history.operation`)."""
    with _relying_on("KerasTensor._keras_history.operation"):
        return tensor._keras_history.operation


def functional_class() -> type:
    """Keras' `Functional` model class (Sequential and Functional subclasses derive from it)."""
    with _relying_on("keras.src.models.functional.Functional"):
        from keras.src.models.functional import Functional

        return Functional


def outputs_structure(model: Any) -> Any:
    """A Functional model's outputs in the structure it was built with (`_outputs_struct`)."""
    with _relying_on("Functional._outputs_struct"):
        return model._outputs_struct


# ---- optimizers

def micro_batches(optimizer: Any) -> Any:
    """`optimizer._iterations`: applied calls, micro-batches under gradient accumulation
    (`optimizer.iterations` counts updates there)."""
    with _relying_on("BaseOptimizer._iterations"):
        return optimizer._iterations


def built_variables(optimizer: Any) -> list:
    """The trainable variables an optimizer was built with, in its order."""
    with _relying_on("BaseOptimizer._trainable_variables"):
        return list(optimizer._trainable_variables)


def variable_index(optimizer: Any, variable: Any) -> int:
    """`optimizer._get_variable_index(variable)`: its position in the built list."""
    with _relying_on("BaseOptimizer._get_variable_index"):
        return optimizer._get_variable_index(variable)


def overwrites_with_gradient(optimizer: Any, variable: Any) -> bool:
    """Whether `apply()` assigns this variable its gradient instead of updating it."""
    with _relying_on("BaseOptimizer._overwrite_variable_with_gradient"):
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
    with _relying_on("BaseOptimizer.apply's pieces (_filter_empty_gradients, "
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
    with _relying_on("BaseOptimizer._overwrite_model_variables_with_average_value"):
        inner._overwrite_model_variables_with_average_value(inner._trainable_variables)


def finish_apply(inner: Any, grads: Sequence[Any], trainable_variables: Optional[Sequence[Any]],
                 ) -> None:
    """The end of `apply()`: variable constraints (on the variables that were updated),
    then one more applied call counted."""
    with _relying_on("BaseOptimizer._trainable_variables / _iterations"):
        tvs = (list(inner._trainable_variables) if trainable_variables is None
               else list(trainable_variables))
        updated = [v for g, v in zip(grads, tvs)
                   if g is not None and not overwrites_with_gradient(inner, v)]
        for variable in updated:
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
        inner._iterations.assign_add(1)


# ---- layers

class AttentionWithOwnSoftmax(keras.layers.MultiHeadAttention):
    """A `MultiHeadAttention` whose attention probabilities always come from
    `self.attention_softmax(axis)` (a layer made once, at build time).

    Relies on two override points of Keras' MultiHeadAttention: `_build_attention`
    (where the stock `Softmax` is made) and `_compute_attention`, which takes
    the explicit path (scores materialized, `self._softmax` called) only when the
    scores are asked for and flash attention is off; otherwise the fused
    `dot_product_attention` would compute the softmax in the compute dtype.
    """

    def attention_softmax(self, axis: Any) -> keras.layers.Layer:  # pragma: no cover
        raise NotImplementedError

    def _build_attention(self, rank: int) -> None:
        with _relying_on("MultiHeadAttention._build_attention / _softmax / _tracker"):
            super()._build_attention(rank)
            stock = self._softmax
            self._tracker.untrack(stock)  # the stock Softmax is no longer a sublayer
            self._softmax = self.attention_softmax(stock.axis)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        with _relying_on("MultiHeadAttention._flash_attention"):
            flash, self._flash_attention = self._flash_attention, False
        try:
            return super()._compute_attention(
                query, key, value, attention_mask=attention_mask, training=training,
                return_attention_scores=True, use_causal_mask=use_causal_mask)
        finally:
            self._flash_attention = flash


# ---- models and trainers

def wrap_step(model: Any, name: str, wrapper: Callable[[Callable], Callable]) -> None:
    """Replaces `model.<name>` (`train_step` / `test_step`) on this instance only with
    `wrapper(original)`, and drops an already traced step function so Keras traces anew."""
    with _relying_on(f"Trainer.{name} and Trainer.{name.split('_')[0]}_function"):
        setattr(model, name, wrapper(getattr(model, name)))
        function = f"{name.split('_')[0]}_function"
        if getattr(model, function, None) is not None:
            setattr(model, function, None)


def model_metrics(model: Any) -> list:
    """The metric objects a model tracks itself (`model._metrics`), where a metric set as
    a model attribute lands and whose results Keras puts in every step's logs."""
    with _relying_on("Layer._metrics"):
        return list(model._metrics)


def forget_train_function(model: Any) -> None:
    """Drops a traced train step, so the next `fit` traces it again (with new metrics)."""
    if getattr(model, "train_function", None) is not None:
        model.train_function = None


def suspend_saving(callback: Any) -> dict[str, Any]:
    """Stops a `BackupAndRestore` / `ModelCheckpoint` from saving and from deleting its
    backup at the end of training; returns what to `setattr` back to undo it.

    Both callbacks read their public constructor arguments `save_freq` and
    `delete_checkpoint` at every epoch and at the end of training.
    """
    saved: dict[str, Any] = {}
    with _relying_on(f"{type(callback).__name__}.save_freq"):
        if isinstance(callback, (keras.callbacks.BackupAndRestore, keras.callbacks.ModelCheckpoint)):
            saved["save_freq"] = callback.save_freq
            callback.save_freq = sys.maxsize  # no end-of-epoch or batch save
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            saved["delete_checkpoint"] = callback.delete_checkpoint
            callback.delete_checkpoint = False
    return saved


def backup_metadata_files(backup_dir: str) -> tuple[str, str]:
    """Where `BackupAndRestore(backup_dir, double_checkpoint=True)` writes its training
    metadata, and its previous copy (read in that order when Keras restores)."""
    with _relying_on("BackupAndRestore._training_metadata_path / _prev_training_metadata_path"):
        backup = keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True)
        return backup._training_metadata_path, backup._prev_training_metadata_path


# ----------------------------------------------- Keras' TensorFlow backend, TensorFlow

def supports_no_merge_call() -> bool:
    """`tf.__internal__.distribute.strategy_supports_no_merge_call()`: the current strategy
    runs updates without `merge_call` (all-GPU mirrored strategies inside XLA)."""
    with _relying_on("tf.__internal__.distribute.strategy_supports_no_merge_call"):
        return bool(tf.__internal__.distribute.strategy_supports_no_merge_call())


def in_multi_worker_mode(strategy: Any) -> bool:
    """A MultiWorkerMirroredStrategy over a cluster of more than one worker."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    with _relying_on("CollectiveAllReduceExtended._in_multi_worker_mode"):
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
    with _relying_on("keras.src.backend.tensorflow.trainer.reduce_per_replica"):
        from keras.src.backend.tensorflow.trainer import reduce_per_replica

        probe = _ReduceProbe()
        reduce_per_replica({"loss": tf.constant(1.0)}, probe, reduction="auto")
    return any(axis == 0 and rank == 0 for _, axis, rank in probe.calls)


def wrap_symbolic_build(model: Any, build_from_local_batch: Callable[[Any], None]) -> None:
    """Makes `model`'s first-batch build fall back to `build_from_local_batch(iterator)`
    where Keras' own `_maybe_symbolic_build` fails on a per-replica batch (the first
    failure of ISSUE_MULTI_WORKER_FIT). Keras' own build is tried first."""
    with _relying_on("TensorFlowTrainer._maybe_symbolic_build"):
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
    with _relying_on("Trainer._symbolic_build"):
        model._symbolic_build(data_batch=data_batch)


def first_batch(iterator: Any) -> Any:
    """The first batch of Keras' epoch iterator (what its symbolic build reads)."""
    with _relying_on("TFEpochIterator (yields (begin, end, iterator))"):
        for _, _, it in iterator:
            return next(it)
    raise KerasInternalsChanged("Keras' epoch iterator yielded no batch to build the model from")


# ------------------------------------------------------------------------------ LiteRT

def interpreter_ops(interpreter: Any) -> list[dict[str, Any]]:
    """Every op of a LiteRT / tf.lite interpreter (`_get_ops_details()`: `op_name`,
    `inputs`, `outputs`), read before the first allocation (delegates replace ops then)."""
    with _relying_on("Interpreter._get_ops_details"):
        return list(interpreter._get_ops_details())
