"""enforce_float32 on Sequential, Functional, nested and subclassed models."""

import keras
import numpy as np
import pytest

import tfmp
from helpers import Subclassed

X = np.random.RandomState(0).rand(8, 12).astype("float32")


def _policies(model):
    from tfmp.rewrite.classify import iter_layers
    return {path: layer.dtype_policy.name for path, layer in iter_layers(model)}


def _check_clone(original, fixed, atol):
    """`fixed` computes what `original` does: outputs within `atol`, or one bfloat16 step
    (2^-7) of their size; its outputs float32, its weights bit-identical."""
    assert fixed is not original
    for a, b in zip(original.get_weights(), fixed.get_weights()):
        np.testing.assert_array_equal(a, b)
    for o in keras.tree.flatten(fixed.outputs):
        assert o.dtype == "float32"
    new = keras.tree.flatten(fixed.predict(X, verbose=0))
    old = keras.tree.flatten(original.predict(X, verbose=0))
    for a, b in zip(old, new):
        assert b.dtype == np.float32
        # The original rounds its outputs to bfloat16: 4.06 comes out as 4.0625, 0.024 from
        # the float32 output, more than `atol` alone allows at that size.
        np.testing.assert_allclose(np.asarray(a, "float32"), b, atol=atol, rtol=2.0**-7)


def test_sequential():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = keras.Sequential([
        keras.Input((12,)), keras.layers.Dense(16), keras.layers.LayerNormalization(),
        keras.layers.Dense(4), keras.layers.Softmax(),
    ])
    before = _policies(model)
    fixed = tfmp.enforce_float32(model)
    assert _policies(model) == before  # original untouched
    assert [l.dtype_policy.name for l in fixed.layers] == [
        "mixed_bfloat16", "float32", "mixed_bfloat16", "float32"]
    _check_clone(model, fixed, atol=2e-2)


def test_functional_two_outputs_and_options():
    keras.config.set_dtype_policy("mixed_float16")
    inputs = keras.Input((12,))
    h = keras.layers.Dense(16, name="body")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    a = keras.layers.Dense(3, activation="softmax", name="head_a")(h)
    b = keras.layers.Dense(1, name="head_b")(h)
    model = keras.Model(inputs, [a, b])
    fixed = tfmp.enforce_float32(model)
    assert {l.name: l.dtype_policy.name for l in fixed.layers
            if not isinstance(l, keras.layers.InputLayer)} == {
        "body": "mixed_float16", "bn": "float32", "head_a": "float32", "head_b": "float32"}
    _check_clone(model, fixed, atol=2e-2)

    only_extra = tfmp.enforce_float32(model, outputs=False, normalization=False,
                                      softmax=False, extra_layers=["body"])
    assert only_extra.get_layer("body").dtype_policy.name == "float32"
    assert only_extra.get_layer("head_b").dtype_policy.name == "mixed_float16"
    by_class = tfmp.enforce_float32(model, outputs=False, extra_layers=[keras.layers.Dense])
    assert by_class.get_layer("head_b").dtype_policy.name == "float32"


def test_nested_model_output():
    keras.config.set_dtype_policy("mixed_bfloat16")
    backbone = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16),
                                 keras.layers.LayerNormalization(name="ln")], name="backbone")
    head = keras.Sequential([keras.Input((16,)), keras.layers.Dense(5, name="logits")], name="head")
    inputs = keras.Input((12,))
    model = keras.Model(inputs, head(backbone(inputs)))
    fixed = tfmp.enforce_float32(model)
    assert fixed.get_layer("backbone").get_layer("ln").dtype_policy.name == "float32"
    assert fixed.get_layer("head").get_layer("logits").dtype_policy.name == "float32"
    assert model.get_layer("head").get_layer("logits").dtype_policy.name == "mixed_bfloat16"
    _check_clone(model, fixed, atol=2e-2)


def test_a_subclassed_model_is_changed_in_place_and_checked_by_running_it():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = Subclassed(keras.layers.Dense(8), keras.layers.LayerNormalization(),
                       keras.layers.Dense(2, activation="softmax"))
    dense, norm, head = model.chain
    before = np.asarray(model(X), "float32")
    weights = model.get_weights()
    fixed = tfmp.enforce_float32(model)
    assert fixed is model  # Keras cannot rebuild it layer by layer: changed in place
    assert (dense.dtype_policy.name, norm.dtype_policy.name,
            head.dtype_policy.name) == ("mixed_bfloat16", "float32", "float32")
    run = tfmp.rewrite.run_model(model)  # what executed, not what the configs say
    assert run.layer(dense.name).ops[0].dtype == "bfloat16"
    assert run.layer(head.name).ops[0].dtype == "float32"  # the head, found by running it
    assert run.output_dtypes == ("float32",) and run.output_producers == (head.name,)
    out = model(X)
    assert out.dtype == "float32"
    np.testing.assert_allclose(np.asarray(out), before, atol=2e-2)
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unbuilt_model_error():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        tfmp.enforce_float32(model)


def _ops_model():
    inp = keras.Input((8,))
    h = keras.layers.Dense(8)(inp)
    h = keras.ops.relu(keras.ops.add(h, inp))  # recorded as operations, not layers
    out = keras.ops.softmax(keras.layers.Dense(3)(h))  # the model ends in an op
    return keras.Model(inp, out)


def test_functional_models_with_keras_ops_between_layers():
    model = _ops_model()
    assert {"Add", "Relu"} <= {type(op).__name__ for op in model.operations}
    prepared, _ = tfmp.prepare(model, "adam", "bf16")
    assert prepared.outputs[0].dtype == "float32"  # the op's output got a float32 cast
    assert tfmp.audit(prepared).ok
    fixed = tfmp.enforce_float32(model)
    assert fixed.outputs[0].dtype == "float32"
    x = np.random.RandomState(0).rand(4, 8).astype("float32")
    np.testing.assert_allclose(prepared(x), model(x), atol=2e-2)  # bfloat16 rounding
