"""One batch run again in float32 with the model's own weights: is precision the cause?

A step that went non-finite in 16 bits may go non-finite in float32 too: weights made
huge by a too-large update, an op outside its domain. Then no float32 layer and no
other precision helps, and saying so is the diagnosis. Mixed precision keeps float32
master weights, so the float32 run is the model's own computation with nothing
approximated: the model converted to float32 (`tfmp.convert_policy`; a copy, or in place
and given back as it was), the batch run forward (and backward when asked), every op
checked. TensorFlow-only (the traced graph of `overflows._Probe`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from tfmp import _compat
from tfmp.rewrite.overflows import _loss_fn, _Probe, _under
from tfmp.rewrite.tracing import split_batch


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
        A `Float32Replay`. The model, its policies and its non-trainable variables (a
        BatchNormalization's moving statistics) are left as they were.
    """
    x, y = split_batch(model, batch)
    loss = _loss_fn(model, None) if y is not None else None

    def run(converted: keras.Model) -> Float32Replay:
        saved = [(v, np.array(v.numpy())) for v in converted.non_trainable_variables]
        try:
            with tf.GradientTape(watch_accessed_variables=gradients) as tape:
                outputs = converted(x, training=True)
                value = None if loss is None else loss(y, outputs)
            _compat.clear_losses(converted)
            grads_ok = None
            if gradients and value is not None:
                grads_ok = _all_finite(tape.gradient(value, converted.trainable_variables))
        finally:
            for variable, before in saved:
                variable.assign(before)
        origins: tuple[str, ...] = ()
        origin_op = None
        outputs_ok, loss_ok = _all_finite(outputs), None if value is None else _all_finite(value)
        if not (outputs_ok and loss_ok is not False and grads_ok is not False):
            probe = _Probe(converted, ("float32", "float64"), None, 1.0)
            stats = probe.run([(x, None)])[0]
            origins = tuple(path for path in probe.layers if stats[path]["made"].any())
            if origins:
                types, made = probe.origin_ops[origins[0]], stats[origins[0]]["made"]
                origin_op = types[int(np.argmax(made))] if len(types) == len(made) else None
        return Float32Replay(outputs_ok, loss_ok, grads_ok, origins, origin_op)

    return _under(model, "float32", [], x, run)
