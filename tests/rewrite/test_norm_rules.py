"""convert_policy's normalization rules at their edges: a second pass starting from the model as
it came, nested models, float32-by-construction consumers, a 16-bit policy given on purpose."""
import keras
import numpy as np

import tfmp
from helpers import HalfRMSNorm
from rewrite import corpus

L = keras.layers


def _compute(model):
    return {l.name: l.compute_dtype for l in model._flatten_layers(include_self=False)}


def test_fallback_after_the_second_pass_starts_from_the_model_as_it_came(caplog):
    # A model built under mixed_bfloat16 going to fp16: the second in-place pass must
    # start from the model as it came, or its fallback keeps pass 1's float32 head.
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = corpus.PostNormNet(norm1=corpus.HalfStatsNorm, name="post_norm")
        model(np.zeros((2, 8), "float32"))
    finally:
        keras.config.set_dtype_policy("float32")
    with caplog.at_level("INFO", logger="absl"):
        tfmp.convert_policy(model, "fp16")
    assert "no layer made float32" in caplog.text
    assert model.head.compute_dtype == "float16" and "call" in vars(model)
    assert model(np.zeros((2, 8), "float32")).dtype == "float32"


def test_a_norm_in_a_nested_model_feeding_an_outer_softmax_is_float32():
    inner = keras.Sequential([keras.Input((8,)), L.Dense(8, name="d_in"),
                              L.LayerNormalization(name="ln_in")], name="inner")
    x = i = keras.Input((8,))
    out = L.Dense(3, activation="softmax", name="head")(inner(x))
    got = _compute(tfmp.convert_policy(keras.Model(i, out), "bf16").get_layer("inner"))
    assert (got["d_in"], got["ln_in"]) == ("bfloat16", "float32"), got


def test_a_norm_feeding_a_float32_by_construction_layer_is_float32():
    x = i = keras.Input((8,))
    x = L.LayerNormalization(name="ln")(L.Dense(8, name="d")(x))
    x = tfmp.layers.Float32Dense(8, name="f32")(x)
    out = L.Dense(3, name="head")(L.Dense(8, name="d2")(x))
    got = _compute(tfmp.convert_policy(keras.Model(i, out), "bf16"))
    assert (got["d"], got["ln"], got["d2"]) == ("bfloat16", "float32", "bfloat16"), got


def test_a_norm_given_a_16_bit_policy_on_purpose_keeps_it_under_float32():
    # Converting to float32 traces nothing and changes no on-purpose dtype
    x = i = keras.Input((8,))
    x = HalfRMSNorm(name="hn", dtype="mixed_bfloat16")(L.Dense(8, name="d")(x))
    out = L.Dense(3, name="head")(L.Dense(8, name="d2")(x))
    got = tfmp.convert_policy(keras.Model(i, out), "float32").get_layer("hn").dtype_policy.name
    assert got == "mixed_bfloat16"
