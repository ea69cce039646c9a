"""run_model: FLOPs of each heavy op from its shapes, and the ops credited to the layer that ran them."""

import keras
import numpy as np

import tfmp


def _flops(layer, shape):
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    run = tfmp.rewrite.run_model(model, np.zeros(shape, "float32"))
    return run.layer(layer.name).flops(), run


def test_flops_of_matmuls_and_convolutions_from_their_shapes():
    # 2 x multiply-adds: batch 2 throughout.
    assert _flops(keras.layers.Dense(5, name="d"), (2, 3))[0] == 2 * 2 * 3 * 5
    conv, _ = _flops(keras.layers.Conv2D(4, 3, padding="same", name="c"), (2, 8, 8, 3))
    assert conv == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    depthwise, _ = _flops(keras.layers.DepthwiseConv2D(3, padding="same", name="dw"), (2, 8, 8, 3))
    assert depthwise == 2 * (2 * 8 * 8 * 3) * (3 * 3)
    transposed, _ = _flops(keras.layers.Conv2DTranspose(4, 2, strides=2, name="t"), (2, 4, 4, 3))
    assert transposed == 2 * (2 * 4 * 4) * (2 * 2 * 4 * 3)
    einsum, run = _flops(keras.layers.EinsumDense("abc,cd->abd", (7, 5), name="e"), (2, 7, 3))
    assert einsum == 2 * 2 * 7 * 3 * 5
    assert run.flops() == einsum and run.share(("bfloat16",)) == 0.0


def test_a_matmul_computed_transposed_counts_the_same():
    class Gram(keras.layers.Layer):
        def call(self, x):  # x^T x: (3 x 2) @ (2 x 3), transpose_a
            return keras.ops.matmul(keras.ops.transpose(x), x)

    assert _flops(Gram(name="g"), (2, 3))[0] == 2 * 3 * 2 * 3
