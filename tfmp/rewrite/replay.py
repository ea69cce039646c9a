"""One batch run again, as the model runs it (`OriginFinder`) and in float32 with the
model's own weights (`replay_in_float32`): where did it go non-finite, and is precision
the cause?

A step that went non-finite in 16 bits may go non-finite in float32 too: weights made
huge by a too-large update, an op outside its domain. Then no float32 layer and no
other precision helps, and saying so is the diagnosis. Mixed precision keeps float32
master weights, so the float32 run is the model's own computation with nothing
approximated: every layer that computes in 16 bits is switched to float32 in place (any
model kind; `float32_layers` and float32 heads are float32 already), the batch run
forward (and backward when asked), every op checked, and everything given back: the
policies, the traced train/test/predict steps (the replay may run in the middle of
`fit`), and the non-trainable variables. TensorFlow-only (`overflows.Probe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import keras
import tensorflow as tf

from tfmp import _compat
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.inplace import policies_of, restore_policies, set_policies
from tfmp.rewrite.overflows import Probe, compiled_loss, holds_nonfinite, non_trainable_state_kept
from tfmp.rewrite.tracing import split_batch


class OriginFinder:
    """Where a batch goes non-finite in `model` as it is (no conversion; every float dtype
    checked; the model's non-trainable variables left as they were). One traced function,
    reused from call to call (traced again only for a new batch shape).

    Args:
        model: A built Keras model.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._probe = Probe(model, ("float16", "bfloat16", "float32", "float64"), None, 1.0)

    def __call__(self, batch: Any) -> tuple[list[str], list[str], bool]:
        """Runs one batch (`x` or `(x, y[, sample_weight])`).

        Returns:
            `(origins, outputs, bad_data)`: the layers, in model order, one of whose ops made
            inf/NaN from finite inputs; the layers whose outputs were not finite; whether the
            batch itself (inputs, targets or sample weights) held inf/NaN.
        """
        x, y = split_batch(self.model, batch)
        probe = self._probe
        stats = probe.run([(x, None)])[0]
        origins = [path for path in probe.layers if stats[path]["made"].any()]
        outputs = [path for path in probe.layers if not stats[path]["outputs_ok"]]
        return origins, outputs, holds_nonfinite(batch)  # sample weights included


@dataclasses.dataclass(frozen=True)
class Float32Replay:
    """What one batch gives in float32 with the model's weights.

    Attributes:
        outputs_finite: The model's outputs were finite.
        loss_finite: The compiled loss was finite (None: no compiled loss or no targets).
        gradients_finite: The gradients of the trainable weights were finite (None: not
            asked for, or no loss).
        origins: The layers, in model order, one of whose ops made inf/NaN from finite
            inputs in float32.
        origin_op: The type of the first such op in the first of them (`"MatMul"`,
            `"Log"`), or None.
    """

    outputs_finite: bool
    loss_finite: Optional[bool]
    gradients_finite: Optional[bool]
    origins: tuple[str, ...]
    origin_op: Optional[str] = None

    @property
    def finite(self) -> bool:
        """Nothing that was computed went non-finite."""
        return (self.outputs_finite and self.loss_finite is not False
                and self.gradients_finite is not False)


def half_dtypes(model: keras.Model) -> set[str]:
    """The 16-bit dtypes any layer of `model` (itself and nested ones included) computes in.

    Args:
        model: A Keras model.

    Returns:
        A subset of `{"float16", "bfloat16"}`.
    """
    return {layer.compute_dtype
            for layer in _compat.flatten_layers(model, include_self=True, recursive=True)
            if layer.compute_dtype in HALF_DTYPES}


@contextlib.contextmanager
def computing_in_float32(model: keras.Model) -> Iterator[keras.Model]:
    """`model` with every layer that computes in 16 bits switched to float32, in place;
    its policies, traced steps and non-trainable variables given back on exit."""
    layers = _compat.flatten_layers(model, include_self=True, recursive=True)
    traced = _compat.traced_functions([l for l in layers if isinstance(l, keras.Model)])
    saved = policies_of(model)
    try:
        with non_trainable_state_kept(model):
            set_policies(model, lambda layer: "float32" if layer.compute_dtype in HALF_DTYPES
                         else None)
            yield model
    finally:
        restore_policies(model, saved)
        _compat.restore_traced_functions(traced)


def _all_finite(tensors: Any) -> bool:
    return all(bool(tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32))))
               for t in keras.tree.flatten(tensors) if t is not None)


def replay_in_float32(model: keras.Model, batch: Any, *, gradients: bool = False) -> Float32Replay:
    """Runs `batch` through `model` computing in float32, with its weights as they are.

    Args:
        model: A built Keras model, under any policy (its variables are float32).
        batch: One batch: `x`, or `(x, y[, sample_weight])`.
        gradients: Also compute the gradients of the compiled loss with respect to the
            trainable weights.

    Returns:
        A `Float32Replay`. The model, its policies, its traced steps and its non-trainable
        variables (a BatchNormalization's moving statistics) are left as they were.
    """
    x, y = split_batch(model, batch)
    loss = compiled_loss(model, None) if y is not None else None
    with computing_in_float32(model):
        with tf.GradientTape(watch_accessed_variables=gradients) as tape:
            outputs = model(x, training=True)
            value = None if loss is None else loss(y, outputs)
        _compat.clear_losses(model)
        grads_ok = None
        if gradients and value is not None:
            grads_ok = _all_finite(tape.gradient(value, model.trainable_variables))
        outputs_ok = _all_finite(outputs)
        loss_ok = None if value is None else _all_finite(value)
        replay = Float32Replay(outputs_ok, loss_ok, grads_ok, ())
        if replay.finite:
            return replay
        probe = Probe(model, ("float32", "float64"), None, 1.0)
        stats = probe.run([(x, None)])[0]
    origins = tuple(path for path in probe.layers if stats[path]["made"].any())
    op = None
    if origins:
        types, made = probe.origin_ops[origins[0]], stats[origins[0]]["made"]
        op = types[int(made.argmax())] if len(types) == len(made) else None
    return dataclasses.replace(replay, origins=origins, origin_op=op)
