"""`tfmp.locate_overflows` and `tfmp.prepare(float32_layers=...)` on tiny models with one
layer that leaves float16's range, run for real (float16 is emulated on CPUs)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from rewrite import corpus
from rewrite.overflow_models import (Energy, Scale, SumOfSquares, TinyVarianceStandardize, chain,
                                     dataset, functional, task)
from tfmp.precision import HardwareInfo
from tfmp.rewrite import kept_float32, locate_overflows

GPU = HardwareInfo("gpu", ("GPU:0",), ((7, 5),))  # a T4: float16 is the mixed precision there
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _policies(model):
    return [(layer.name, layer.dtype_policy.name) for layer in model._flatten_layers()]


@pytest.mark.parametrize("layer,op", [(Energy, "Square"), (TinyVarianceStandardize, "RealDiv")])
def test_the_locator_names_exactly_the_overflowing_layer(layer, op):
    model = functional(layer(name="suspect"))
    x, y = task(64)
    policies, weights = _policies(model), model.get_weights()
    report = locate_overflows(model, (x, y), steps=2, loss=CE)
    assert report.paths == ["suspect"], str(report)
    row = report.layers[0]
    assert row.op == op and row.first_step == 0 and row.nonfinite_steps == 2, row
    assert "inf/NaN in float16" in row.reason and "suspect" in str(report)
    assert {r.path for r in report.rows} >= {"d1", "concat", "head"}
    assert _policies(model) == policies  # the caller's model untouched
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert dict(report.policy_map.items()) == {"suspect": keras.dtype_policies.get("float32")}
    assert report.policy_map["d1"].name == "mixed_float16"
    assert report.to_dict()["float32_layers"] == {"suspect": row.reason}
    # every row measured backward too (inputs watched: `suspect` uses no variable)
    assert all(r.gradient_underflow is not None for r in report.rows), str(report)
    if layer is Energy:  # log1p(inf): its output, and what follows, is not finite
        outputs = {r.path: r.nonfinite_output_steps for r in report.rows}
        assert outputs["suspect"] == 2 and outputs["d1"] == 0
        assert report.first_nonfinite_output() == "suspect"


def test_inputs_that_hold_nan_are_bad_data_not_a_layer():
    x, y = task(64)
    x[40, 3] = np.nan  # batch 1 of 2
    report = locate_overflows(functional(keras.layers.Dense(1, name="plain")), (x, y), steps=2)
    assert report.nonfinite_input_steps == (1,) and report.ok, str(report)
    assert "the inputs themselves held inf/NaN on batch(es) 1: bad data" in str(report)


def test_a_constant_inf_is_not_an_overflow():
    @keras.saving.register_keras_serializable("tfmp_overflow_tests")
    class MaskedExp(keras.layers.Layer):  # exp(-inf) where masked: 0, on purpose
        def call(self, x):
            fill = tf.constant(-np.inf, dtype=x.dtype)
            return keras.ops.exp(keras.ops.where(x > 0, keras.ops.zeros_like(x), fill))

    report = locate_overflows(functional(MaskedExp(name="masked")), task(64), steps=1)
    assert report.ok, str(report)


def test_a_causal_mask_is_not_an_overflow():
    inputs = keras.Input((6, 8))
    h = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs, use_causal_mask=True)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h)))
    x = np.random.RandomState(0).randn(16, 6, 8).astype("float32")
    report = locate_overflows(model, x, steps=1)
    assert report.ok, str(report)


def test_a_healthy_model_yields_no_layer():
    model = functional(keras.layers.Dense(1, name="plain"))
    report = locate_overflows(model, dataset(), steps=2, loss=CE)
    assert report.ok and report.paths == [] and "no layer needs float32" in str(report)
    assert max(r.largest for r in report.rows) > 0  # it did look at the values


def test_an_overflow_that_moves_to_the_next_layer_is_followed():
    # sum_sq overflows; kept in float32 its output (~1e6) overflows `mid`'s float16 input.
    model = chain(SumOfSquares(name="sum_sq"), keras.layers.Dense(4, name="mid"))
    report = locate_overflows(model, task(64), steps=1)
    assert report.paths == ["sum_sq", "mid"], str(report)
    assert report.layers[1].op == "Cast"  # its float16 input cast made inf
    prepared, opt = tfmp.prepare(model, "adam", "fp16", hardware=GPU,
                                 float32_layers=report.paths)
    prepared.compile(opt, CE)
    x, y = task(64)
    history = prepared.fit(x, y, epochs=2, batch_size=32, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_margin_condemns_values_near_the_maximum():
    model = chain(Scale(name="scale"), keras.layers.Dense(4, name="mid"))
    x = np.random.RandomState(0).uniform(0.9, 1.0, (32, 8)).astype("float32")  # 36000-40000
    near = locate_overflows(model, x, steps=1, margin=0.5)
    assert "scale" in near.paths and "0.6" in near.layers[0].reason, str(near)
    lenient = locate_overflows(model, x, steps=1, margin=1.0)
    assert "scale" not in lenient.paths, str(lenient)
    assert lenient.rows[[r.path for r in lenient.rows].index("scale")].largest > 36000


def test_gradient_underflow_is_measured_at_the_loss_scale():
    keras.utils.set_random_seed(0)  # the figures depend on the weights: not on the test order
    model = functional(keras.layers.Dense(1, name="plain"))

    def tiny(y, logits):  # gradients ~1e-9: below float16's 6e-8 unless scaled
        return 1e-8 * CE(y, logits)

    unscaled = locate_overflows(model, task(64), steps=1, loss=tiny, loss_scale=1.0)
    scaled = locate_overflows(model, task(64), steps=1, loss=tiny, loss_scale=2.0**15)
    share = {r.path: r.gradient_underflow for r in unscaled.rows}
    assert share["d1"] > 0.9, str(unscaled)
    assert {r.path: r.gradient_underflow for r in scaled.rows}["d1"] < 0.1, str(scaled)
    assert unscaled.ok  # small gradients are the loss scale's business, not a layer's


def test_bfloat16_overflow_is_found_the_same_way():
    @keras.saving.register_keras_serializable("tfmp_overflow_tests")
    class Huge(keras.layers.Layer):
        def call(self, x):
            return ops_log1p_sum_square(x * 1e30)

    model = functional(Huge(name="huge"))
    report = locate_overflows(model, task(32), steps=1, policy="bf16")
    assert report.policy == "mixed_bfloat16" and report.paths == ["huge"], str(report)
    assert not locate_overflows(functional(Energy(name="energy")), task(32), steps=1,
                                policy="bf16").paths  # 1e6 is nothing for bfloat16


def ops_log1p_sum_square(x):
    return keras.ops.log1p(keras.ops.sum(keras.ops.square(x), axis=-1, keepdims=True))


def test_compare_fails_plain_float16_and_passes_with_auto_float32_layers():
    def build():
        return functional(Energy(name="energy"))

    plain = tfmp.compare_precision(build, dataset(), policies=("fp32", "fp16"), steps=6,
                                   hardware=GPU)
    assert not plain.ok and "not finite" in plain.verdicts[0].reason, str(plain)
    fixed = tfmp.compare_precision(build, dataset(), policies=("fp32", "fp16"), steps=6,
                                   hardware=GPU, float32_layers="auto")
    assert fixed.ok, str(fixed)
    assert fixed.runs[1].skipped_steps == 0


def test_prepare_auto_keeps_the_found_layer_and_the_audit_says_why():
    model = functional(Energy(name="energy"))
    x, y = task(64)
    prepared, opt = tfmp.prepare(model, "adam", "fp16", hardware=GPU, float32_layers="auto",
                                 calibration_data=(x, y))
    assert dict(_policies(prepared))["energy"] == "float32"
    assert dict(_policies(prepared))["d1"] == "mixed_float16"
    assert list(kept_float32(prepared)) == ["energy"]
    report = tfmp.audit(prepared, opt, hardware=GPU)
    kept = [f for f in report.findings if f.code == "kept-float32"]
    assert [f.path for f in kept] == ["energy"] and "Square" in kept[0].problem
    assert "policy-mismatch" not in report.codes(), str(report)
    # by name and by class; float32 has nothing to locate
    by_class, _ = tfmp.prepare(model, "adam", "fp16", hardware=GPU, float32_layers=[Energy])
    assert dict(_policies(by_class))["energy"] == "float32"
    f32, _ = tfmp.prepare(model, "adam", "float32", hardware=GPU, float32_layers="auto")
    assert kept_float32(f32) == {}


def test_a_layer_no_policy_can_reach_is_refused_not_silently_kept():
    model = corpus.SubclassedNet(name="net")  # converted in place: block/dense is the custom
    model(np.zeros((2, 8), "float32"))         # Block's own sublayer, out of prepare's reach
    with pytest.raises(ValueError, match="float32_layers: block/dense could not be made float32"):
        tfmp.prepare(model, "adam", "fp16", hardware=GPU, float32_layers=["block/dense"])
    assert model.get_layer("block").dense.dtype_policy.name == "float32"  # as it came
    prepared, _ = tfmp.prepare(model, "adam", "fp16", hardware=GPU, float32_layers=["block"])
    assert prepared.get_layer("block").compute_dtype == "float32"


def test_a_compiled_multi_output_loss_gives_gradient_figures():
    kind = corpus.KINDS["subclassed_two_heads"]
    model = kind.build()
    model.compile("adam", [CE, "mse"])
    x, y = corpus.data(kind, n=8)
    report = locate_overflows(model, (x, y), steps=1, batch_size=8)
    assert report.ok and all(r.gradient_underflow is not None for r in report.rows), str(report)


@pytest.mark.parametrize("kwargs,message", [
    ({"float32_layers": ["nope"]}, "no layer of"),
    ({"float32_layers": "auto"}, "needs calibration_data"),
    ({"float32_layers": "some"}, "give 'auto'"),
    ({"float32_layers": 3}, "give 'auto'"),
])
def test_prepare_refuses_bad_float32_layers_in_one_line(kwargs, message):
    model = functional(Energy(name="energy"))
    with pytest.raises(ValueError, match=message) as caught:
        tfmp.prepare(model, "adam", "fp16", hardware=GPU, **kwargs)
    assert "\n" not in str(caught.value)
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("kwargs,message", [
    ({"policy": "float32"}, "16-bit policy"),
    ({"steps": 0}, "steps must be"),
    ({"margin": 2}, "margin must be"),
    ({"loss": 3}, "not a Keras loss"),
])
def test_locator_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        locate_overflows(functional(Energy()), task(32), **{"steps": 1, **kwargs})


@pytest.mark.parametrize("name", sorted(corpus.KINDS))
def test_every_model_kind_goes_through_the_locator_untouched(name):
    kind = corpus.KINDS[name]
    model = kind.build()
    x, y = corpus.data(kind, n=4)
    policies, weights = _policies(model), model.get_weights()
    # MobileNet forward only: its float32 backward pass alone takes ~4 s here.
    loss = CE if kind.outputs == 1 and not kind.eager else None
    report = locate_overflows(model, (x, y), steps=1, batch_size=4, loss=loss)
    assert report.ok, str(report)
    assert len(report.rows) >= 3 and max(r.largest for r in report.rows) > 0
    if loss:
        assert any(r.gradient_underflow is not None for r in report.rows), str(report)
    assert _policies(model) == policies
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
