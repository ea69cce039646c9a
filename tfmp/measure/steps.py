"""The traced train step `compare_precision` times (TensorFlow: a GradientTape in a tf.function)."""

from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from tfmp.scaling import get_unscaled_gradients


def train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer,
               loss_fn: Any, jit_compile: bool = False) -> Callable[[Any, Any], tuple[Any, Any]]:
    """A compiled step: forward, scaled loss, gradients, apply.

    Args:
        model: The model to train.
        optimizer: Its (loss-scale) optimizer, built.
        loss_fn: `loss_fn(y_true, y_pred)`.
        jit_compile: Compile the step with XLA.

    Returns:
        `step(x, y) -> (loss, gradient_norm)`: the unscaled loss and the global norm
        of the unscaled gradients.
    """

    def step(x, y):
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        unscaled = get_unscaled_gradients(optimizer, grads)  # 16-bit weights: 16-bit grads
        norm = tf.linalg.global_norm([None if g is None else tf.cast(g, "float32")
                                      for g in unscaled])
        optimizer.apply(grads, variables)
        return loss, norm

    return tf.function(step, jit_compile=jit_compile)
