"""tfmp.prepare: float32 -> mixed conversion, training, and raising on errors."""

import warnings

import keras
import numpy as np
import pytest

import tfmp
from tfmp.hardware import HardwareInfo

GPU = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))
rng = np.random.RandomState(0)
X = rng.rand(512, 16).astype("float32")
Y = (X[:, :8].sum(1) > X[:, 8:].sum(1)).astype("int32")


def _float32_model():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.LayerNormalization(), keras.layers.Dense(2, activation="softmax"),
    ])


@pytest.mark.parametrize("precision, compute", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_float32_model_is_converted_and_trains(precision, compute):
    original = _float32_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt = tfmp.prepare(original, keras.optimizers.Adam(1e-2), precision, hardware=GPU)
    assert [l.compute_dtype for l in model.layers] == [compute, "float32", "float32"]
    assert [l.compute_dtype for l in original.layers] == ["float32"] * 3
    for a, b in zip(original.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert isinstance(opt, tfmp.DynamicLossScaleOptimizer) == (precision == "fp16")
    np.testing.assert_allclose(model.predict(X[:32], verbose=0),
                               original.predict(X[:32], verbose=0), atol=3e-2)
    model.compile(opt, "sparse_categorical_crossentropy")
    assert model.optimizer is opt
    hist = model.fit(X, Y, epochs=3, batch_size=32, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0] * 0.8
    assert tfmp.audit(model, opt, hardware=GPU).ok


def test_prepare_float32_keeps_model_and_only_enforces():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    prepared, opt = tfmp.prepare(model, "adam", "bf16", hardware=GPU)
    assert [l.compute_dtype for l in prepared.layers] == ["bfloat16", "float32"]
    assert isinstance(opt, keras.optimizers.Adam)
    assert tfmp.global_policy_name() == "mixed_bfloat16"


def test_prepare_raises_on_audit_errors():
    keras.config.set_dtype_policy("float16")  # pure float16 variables: cannot be fixed here
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    with pytest.raises(tfmp.AuditError) as err:
        tfmp.prepare(model, "adam", "fp16", hardware=GPU)
    assert "variable-not-float32" in err.value.report.codes()
    assert "float16" in str(err.value)
