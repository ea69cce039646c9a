"""tfmp.layers: float32 computation, dtypes out, and .keras round trips."""

import keras
import numpy as np
import pytest

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
