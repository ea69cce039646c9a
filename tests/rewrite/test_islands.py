"""Float32 islands: which activations move to float32, where, and that nothing else changes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from tfmp.precision import HardwareInfo
from tfmp.rewrite.islands import ISLANDS, apply_islands, float32_gelu, float32_selu, float32_sigmoid

import models

CPU = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))
GPU = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))
BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits


def _transformer():
    keras.utils.set_random_seed(3)
    return models.get("transformer")[0](input_shape=(8,), vocab_size=50, dim=16, heads=2,
                                        depth=1)


def _activations(model):
    return {layer.name: layer.activation.__name__ for layer in model._flatten_layers()
            if getattr(layer, "activation", None) is not None}


def test_island_gelu_is_the_float32_gelu_rounded_once():
    x = tf.cast(tf.linspace(-6.0, 6.0, 4001), tf.bfloat16)
    island = float32_gelu(x)
    assert island.dtype == tf.bfloat16
    exact = keras.activations.gelu(tf.cast(x, tf.float32))
    np.testing.assert_array_equal(island.numpy(), tf.cast(exact, tf.bfloat16).numpy())
    # bfloat16's own gelu agrees with it to bfloat16 rounding (a few ulps, not more)
    stock = tf.cast(keras.activations.gelu(x), tf.float32).numpy()
    np.testing.assert_allclose(tf.cast(island, tf.float32).numpy(), stock,
                               rtol=4 * BF16_EPS, atol=4 * BF16_EPS)


@pytest.mark.parametrize("island, activation", [
    (float32_gelu, keras.activations.gelu), (float32_sigmoid, keras.activations.sigmoid),
    (float32_selu, keras.activations.selu)], ids=["gelu", "sigmoid", "selu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_island_is_its_activation_in_float32_rounded_once(island, activation, dtype):
    x = tf.cast(tf.linspace(-6.0, 6.0, 4001), dtype)
    out = island(x)
    assert out.dtype == dtype
    exact = activation(tf.cast(x, tf.float32))
    np.testing.assert_array_equal(out.numpy(), tf.cast(exact, dtype).numpy())
    assert [i.replacement for i in ISLANDS if i.activation is activation] == [island]


def test_prepare_puts_gelu_in_float32_on_a_bf16_cpu_and_outputs_stay_within_bf16_rounding():
    source = _transformer()
    model, _ = tfmp.prepare(source, "adam", "bf16", hardware=CPU)
    plain, _ = tfmp.prepare(source, "adam", "bf16", hardware=CPU, float32_islands=False)
    assert _activations(model)["block0_ff1"] == "float32_gelu"
    assert _activations(plain)["block0_ff1"] == "gelu"
    assert _activations(source)["block0_ff1"] == "gelu"  # the user's model is untouched
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    ids = np.random.RandomState(0).randint(0, 50, (64, 8)).astype("int32")
    out, ref = model(ids).numpy(), plain(ids).numpy()
    assert out.dtype == np.float32
    assert not np.array_equal(out, ref)  # the island did change the computation ...
    scale = np.abs(ref).max()  # ... by bfloat16 rounding of one activation, no more
    np.testing.assert_allclose(out, ref, atol=8 * BF16_EPS * scale)


@pytest.mark.parametrize("precision,hardware", [("bf16", GPU), ("float32", CPU)])
def test_no_island_where_16_bits_is_not_slower(precision, hardware):
    model, _ = tfmp.prepare(_transformer(), "adam", precision, hardware=hardware)
    assert _activations(model)["block0_ff1"] == "gelu"


def test_only_16_bit_layers_change_and_each_island_is_reported():
    with tfmp.policy_scope("bf16", CPU):
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(8, activation="gelu", name="g"),
            keras.layers.Dense(8, activation="sigmoid", name="s"),
            keras.layers.Dense(8, activation="relu", name="r"),  # faster in bf16: kept
            keras.layers.Dense(8, activation="selu", dtype="float32", name="f32"),
        ])
    changed = apply_islands(model, "mixed_bfloat16", CPU)
    assert changed == ["g: gelu -> float32_gelu", "s: sigmoid -> float32_sigmoid"]
    assert _activations(model) == {"g": "float32_gelu", "s": "float32_sigmoid", "r": "relu",
                                   "f32": "selu"}
    assert {i.replacement.__name__ for i in ISLANDS} >= {"float32_gelu", "float32_sigmoid"}


def test_a_model_with_islands_saves_and_loads(tmp_path):
    model, _ = tfmp.prepare(_transformer(), "adam", "bf16", hardware=CPU)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert _activations(loaded)["block0_ff1"] == "float32_gelu"
    ids = np.arange(16, dtype="int32").reshape(2, 8)
    np.testing.assert_array_equal(loaded(ids).numpy(), model(ids).numpy())
