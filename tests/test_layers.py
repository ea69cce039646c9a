"""tfmp.layers: float32 computation, dtypes out, and .keras round trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from tfmp import layers as L

X = np.random.RandomState(0).normal(size=(4, 16)).astype("float32") * 300


def test_stable_layer_norm_normalizes_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = L.StableLayerNorm()
    out = layer(X)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.gamma.dtype == "float32"
    mean, std = X.mean(-1, keepdims=True), X.std(-1, keepdims=True)
    expected = (X - mean) / np.sqrt(std**2 + layer.epsilon)
    # Only the final cast to bfloat16 (8 bits of mantissa) is lost.
    np.testing.assert_allclose(np.asarray(out, "float32"), expected, rtol=1e-2, atol=1e-2)


def test_float32_output_and_dense_ignore_policy():
    keras.config.set_dtype_policy("mixed_float16")
    out = L.Float32Output()(keras.ops.cast(X, "float16"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    dense = L.Float32Dense(3, dtype="float16")
    assert dense.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(dense(X).dtype) == "float32"


@pytest.mark.parametrize("output_dtype, expected", [(None, "float32"), ("bfloat16", "bfloat16")])
def test_stable_softmax(output_dtype, expected):
    keras.config.set_dtype_policy("mixed_bfloat16")
    logits = keras.ops.cast(X / 30, "bfloat16")
    probs = L.StableSoftmax(output_dtype=output_dtype)(logits)
    assert keras.backend.standardize_dtype(probs.dtype) == expected
    ref = keras.ops.softmax(keras.ops.cast(logits, "float32"))
    np.testing.assert_allclose(np.asarray(probs, "float32"), ref, atol=1e-2)
    np.testing.assert_allclose(np.asarray(probs, "float32").sum(-1), 1.0, atol=1e-2)


def test_stable_softmax_mask():
    probs = L.StableSoftmax()(np.zeros((1, 4), "float32"), mask=np.array([[1, 1, 0, 0]], bool))
    np.testing.assert_allclose(np.asarray(probs), [[0.5, 0.5, 0.0, 0.0]])


def test_keras_round_trip_of_tfmp_layers(tmp_path):
    keras.config.set_dtype_policy("mixed_bfloat16")
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32)(inputs)
    h = L.StableLayerNorm()(h)
    h = L.Float32Dense(8)(h)
    h = L.StableSoftmax()(h)
    model = keras.Model(inputs, L.Float32Output()(h))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
    np.testing.assert_array_equal(model.predict(X, verbose=0), loaded.predict(X, verbose=0))
    assert loaded.outputs[0].dtype == "float32"
    assert tfmp.audit(loaded).ok


# ------------------------------------------ 16-bit inputs where 16 bits are wrong

def test_stable_layer_norm_is_right_where_a_16_bit_one_is_not():
    rng = np.random.RandomState(0)
    x = keras.ops.cast((1000 + rng.randn(4, 64)).astype("float32"), "bfloat16")
    x64 = np.asarray(keras.ops.cast(x, "float32"), "float64")
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-3)
    layer = tfmp.layers.StableLayerNorm(dtype="mixed_bfloat16", epsilon=1e-3)
    out = layer(x)
    assert out.dtype == "bfloat16"
    stable_err = np.abs(np.asarray(keras.ops.cast(out, "float32")) - ref).max()
    # The same normalization computed in bfloat16 (what the layer must not do):
    mean = keras.ops.mean(x, -1, keepdims=True)
    var = keras.ops.mean(keras.ops.square(x - mean), -1, keepdims=True)
    half = (x - mean) / keras.ops.sqrt(var + keras.ops.cast(1e-3, "bfloat16"))
    half_err = np.abs(np.asarray(keras.ops.cast(half, "float32")) - ref).max()
    assert stable_err < 0.02 < 0.05 < half_err  # measured: 0.013 vs 0.075


def test_stable_softmax_keeps_probabilities_float16_would_flush_to_zero():
    logits = keras.ops.cast(np.array([[0.0, -20.0, -30.0]], "float32"), "float16")
    stable = np.asarray(tfmp.layers.StableSoftmax()(logits))
    stock = np.asarray(keras.ops.cast(keras.layers.Softmax(dtype="mixed_float16")(logits),
                                      "float32"))
    assert (stable > 0).all()  # e^-20 = 2e-9, e^-30 = 9e-14 survive in float32
    np.testing.assert_allclose(stable[0, 1:], np.exp([-20.0, -30.0]), rtol=1e-5)
    assert (stock[0, 1:] == 0).all()  # below float16's smallest subnormal: log(0) in a loss


def _softmax_dtypes(layer, q, kv) -> set:
    """The dtypes the exponentials (Softmax, Exp ops) of one traced call of an attention
    layer compute in."""
    graph = tf.function(lambda a, b: layer(a, b, return_attention_scores=True)
                        ).get_concrete_function(q, kv).graph
    return {op.get_attr("T").name for op in graph.get_operations()
            if op.type in ("Softmax", "Exp")}


def test_stable_multi_head_attention_softmax_runs_in_float32():
    rng = np.random.RandomState(0)
    q = rng.randn(2, 4, 16).astype("float32") * 3
    kv = rng.randn(2, 256, 16).astype("float32") * 3
    errors, softmax = {}, {}
    for cls in (tfmp.layers.StableMultiHeadAttention, keras.layers.MultiHeadAttention):
        keras.utils.set_random_seed(1)
        layer = cls(num_heads=2, key_dim=8, dtype="mixed_float16")
        _, scores = layer(q, kv, return_attention_scores=True)
        assert scores.dtype == "float16"
        total = np.asarray(keras.ops.sum(keras.ops.cast(scores, "float32"), axis=-1))
        errors[cls] = np.abs(total - 1.0).max()
        softmax[cls] = _softmax_dtypes(layer, q, kv)
    # What runs: the softmax op itself, whatever the CPU (stock Keras' runs in float16).
    assert softmax == {tfmp.layers.StableMultiHeadAttention: {"float32"},
                       keras.layers.MultiHeadAttention: {"float16"}}
    # Probabilities computed in float32 and rounded once to float16 sum to 1 within
    # 2**-11. How close the stock float16 softmax comes depends on the CPU's float16
    # arithmetic (6.2e-4 on AMD EPYC, 2.47e-4 with avx512_fp16), so it is not compared.
    assert errors[tfmp.layers.StableMultiHeadAttention] <= 2.0**-11
