"""Tiny models with one layer that leaves float16's range (float16 is emulated on CPUs:
they must stay tiny). Each layer is exact in float32."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

PACKAGE = "tfmp_overflow_tests"


@keras.saving.register_keras_serializable(PACKAGE)
class Energy(keras.layers.Layer):
    """log(1 + sum((300 x)^2)): the squares pass 65504 in float16 (inf), its output does not."""

    def call(self, x):
        return ops.log1p(ops.sum(ops.square(x * 300.0), axis=-1, keepdims=True))


@keras.saving.register_keras_serializable(PACKAGE)
class TinyVarianceStandardize(keras.layers.Layer):
    """(x - mean) / sqrt(var + 1e-12) of inputs scaled by 1e-4: GroupNormalization's
    statistics with a tiny epsilon. In float16 the variance (~1e-9) and the epsilon flush
    to zero and the division makes inf/NaN."""

    def call(self, x):
        h = x * 1e-4
        mean = ops.mean(h, axis=-1, keepdims=True)
        var = ops.mean(ops.square(h - mean), axis=-1, keepdims=True)
        return (h - mean) / ops.sqrt(var + 1e-12)


@keras.saving.register_keras_serializable(PACKAGE)
class SumOfSquares(keras.layers.Layer):
    """sum((300 x)^2): overflows float16 itself, and its float32 output (~1e6) overflows
    the float16 layer after it."""

    def call(self, x):
        return ops.sum(ops.square(x * 300.0), axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(PACKAGE)
class Scale(keras.layers.Layer):
    """x * 40000: finite in float16 for x < 1.6, past half its maximum for x > 0.82."""

    def call(self, x):
        return x * 40000.0


def functional(layer: keras.layers.Layer, units: int = 16) -> keras.Model:
    """input -> [Dense(relu) | layer] -> concat -> Dense(2): `layer` on its own branch."""
    inputs = keras.Input((8,))
    h = keras.layers.Dense(units, activation="relu", name="d1")(inputs)
    h = keras.layers.Concatenate(name="concat")([h, layer(inputs)])
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def chain(*layers: keras.layers.Layer) -> keras.Model:
    """input -> layers -> Dense(2)."""
    return keras.Sequential([keras.Input((8,)), *layers, keras.layers.Dense(2, name="head")])


def task(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable task: the label is whether the first input is positive."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 8).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def dataset(batch: int = 32, n: int = 256) -> tf.data.Dataset:
    """`task()` in batches, repeated."""
    return tf.data.Dataset.from_tensor_slices(task(n)).batch(batch).repeat()
