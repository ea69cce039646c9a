"""tfmp.prepare: float32 -> mixed conversion, training, and raising on errors."""

import logging
import warnings

import keras
import numpy as np
import pytest

import helpers
import tfmp
from tfmp.precision import HardwareInfo

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
    assert tfmp.precision.policy.global_policy_name() == "mixed_bfloat16"


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16", "float32"])
def test_a_keyword_no_precision_takes_is_refused_under_every_precision(precision):
    with pytest.raises(ValueError) as error:
        tfmp.prepare(_float32_model(), keras.optimizers.Adam(), precision, hardware=GPU, foo=1,
                     initail_scale=3, float32_layer=["dense"], dat=X)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "tfmp.prepare() got keyword arguments no precision takes: foo=1, initail_scale=3 (did "
        "you mean initial_scale?), float32_layer=['dense'] (did you mean float32_layers?), "
        "dat=array(["), message  # an array's many lines: short, on one line
    assert message.endswith(
        " (did you mean data?); it takes model, optimizer, precision, loss_scale, guard, "
        "float32_islands, hardware, data, float32_layers, calibration_data, weights_dtype and "
        "DynamicLossScaleOptimizer's initial_scale, dynamic_growth_steps, name, growth_interval, "
        "growth_factor, backoff_factor, min_scale, max_scale, hysteresis, dynamic."), message
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "float32"])
def test_a_loss_scale_argument_only_float16_uses_is_ignored_with_one_line(precision, caplog):
    caplog.set_level(logging.WARNING)
    _, opt = tfmp.prepare(_float32_model(), "adam", precision, hardware=GPU, hysteresis=2)
    assert isinstance(opt, keras.optimizers.Adam)
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert ignored == [f"tfmp: hysteresis ignored: {precision} uses no loss scaling (pass "
                       "guard=True for the NaN guard)."], ignored


def test_prepare_raises_on_audit_errors():
    keras.config.set_dtype_policy("float16")  # pure float16 variables
    model = helpers.Subclassed()  # subclassed: cannot be rebuilt, only audited
    model(np.zeros((1, 16), "float32"))
    with pytest.raises(tfmp.AuditError) as err:
        tfmp.prepare(model, "adam", "fp16", hardware=GPU)
    codes = err.value.report.codes()
    assert {"variable-not-float32", "optimizer-slot-not-float32"} <= codes  # slots predicted
    assert "float16" in str(err.value)


def test_a_pure_float16_model_is_rebuilt_with_float32_variables():
    keras.config.set_dtype_policy("float16")
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    prepared, _ = tfmp.prepare(model, "adam", "fp16", hardware=GPU)
    assert all(v.dtype == "float32" for v in prepared.weights)
    for a, b in zip(model.get_weights(), prepared.get_weights()):
        np.testing.assert_array_equal(a.astype("float32"), b)


@pytest.mark.parametrize("source, target, compute", [
    ("mixed_bfloat16", "fp32", "float32"), ("mixed_float16", "bf16", "bfloat16"),
    ("mixed_bfloat16", "fp16", "float16"),
])
def test_a_mixed_model_is_rebuilt_under_the_policy_asked_for(source, target, compute):
    keras.config.set_dtype_policy(source)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="hidden"),
                              keras.layers.Dense(2, name="out")])
    prepared, _ = tfmp.prepare(model, "adam", target, hardware=GPU)
    assert prepared.get_layer("hidden").compute_dtype == compute  # not left in 16 bits
    assert prepared.outputs[0].dtype == "float32"
    assert "policy-mismatch" not in tfmp.audit(prepared).codes()
    for a, b in zip(model.get_weights(), prepared.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_convert_policy_round_trip_keeps_weights_bit_identical_and_outputs_float32():
    import models

    keras.utils.set_random_seed(5)
    original = models.get("cnn")[0](input_shape=(8, 8, 3), width=8, stages=1)  # BatchNorm inside
    weights = original.get_weights()
    model = original
    for policy in ("bf16", "mixed_float16", "float32"):
        model = tfmp.convert_policy(model, policy)
        canonical = tfmp.precision.policy.parse_precision(policy)
        assert all(o.dtype == "float32" for o in model.outputs), policy
        convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
        assert {l.dtype_policy.name for l in convs} == {canonical}, policy
        norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        assert {l.dtype_policy.name for l in norms} == {canonical}, policy  # float32 inside
        for a, b in zip(weights, model.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert original.layers[1].dtype_policy.name == "float32"  # the input model is untouched
    with pytest.raises(ValueError, match="Unknown precision 'fp8'"):
        tfmp.convert_policy(model, "fp8")


@pytest.mark.parametrize("built_under, target", [("mixed_bfloat16", "float32"),
                                                 ("float32", "mixed_bfloat16")])
def test_convert_policy_reaches_sublayers_a_custom_layer_makes(built_under, target):
    """The transformer's embedding layer makes two Embeddings in `__init__`: they
    follow the target policy whatever the global policy is (it stays as it was)."""
    import models

    keras.config.set_dtype_policy(built_under)
    model = models.get("transformer")[0](input_shape=(8,), vocab_size=50, dim=8, heads=2, depth=1)
    converted = tfmp.convert_policy(model, target)
    embed = converted.get_layer("embed")
    assert {l.dtype_policy.name for l in (embed, embed.tokens, embed.positions)} == {target}
    assert keras.config.dtype_policy().name == built_under
    keras.config.set_dtype_policy("float32")


class NormNet(keras.Model):
    """Subclassed: a LayerNormalization, a 16-bit-statistics norm, a head."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(16, name="d1")
        self.ln = keras.layers.LayerNormalization(name="ln")
        self.half = helpers.HalfRMSNorm(name="half_norm")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.half(self.ln(self.hidden(x))))


def _norms_model():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((16,))
    x = keras.layers.LayerNormalization(name="ln")(keras.layers.Dense(16, name="d1")(x))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(16, name="d2")(x))
    x = helpers.HalfRMSNorm(name="half_norm")(keras.layers.Dense(16, name="d3")(x))
    x = keras.layers.UnitNormalization(name="unit")(keras.layers.Dense(16, name="d4")(x))
    x = keras.layers.LayerNormalization(name="ln_before_head")(keras.layers.Dense(16, name="d5")(x))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


CPU_BF16 = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))  # where GELU's island applies


@pytest.mark.parametrize("case, traces", [("converted once", 1), ("converted twice", 1),
                                          ("island", 2)])
def test_prepare_traces_the_model_it_returns_once_unless_it_changed_after(case, traces):
    # The trace the conversion made to place the normalization statistics is the audit's:
    # not when a 16-bit-statistics norm made it convert again (that trace was of the first
    # copy), nor when an island changed an activation after it.
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((16,))
    x = keras.layers.Dense(16, activation="gelu" if case == "island" else "relu")(x)
    x = keras.layers.LayerNormalization()(helpers.CountCalls(name="count")(x))
    if case == "converted twice":
        x = helpers.HalfRMSNorm()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(16)(x)))
    hardware = CPU_BF16 if case == "island" else GPU
    prepared, opt = tfmp.prepare(model, keras.optimizers.Adam(), "bf16", hardware=hardware)
    assert prepared is not model
    count = prepared.get_layer("count")
    assert count.training_calls == traces
    # audit(run=) judges the trace it is given, as it would judge its own
    run = tfmp.rewrite.run_model(prepared)
    given = tfmp.audit(prepared, opt, hardware, run=run)
    assert count.training_calls == traces + 1
    assert given.to_dict() == tfmp.audit(prepared, opt, hardware).to_dict()


@pytest.mark.parametrize("precision, half", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_normalization_outputs_stay_16_bit_where_statistics_are_float32_inside(precision, half):
    # Keras' LayerNormalization and BatchNormalization compute their statistics in float32
    # inside call: their outputs stay 16-bit (half the memory). A norm that would take the
    # root of a sum in 16 bits, or whose output feeds the float32 head, computes in float32.
    expected = {"ln": half, "bn": half, "half_norm": "float32", "unit": "float32",
                "ln_before_head": "float32", "head": "float32"}
    for build in (_norms_model, lambda: NormNet()):
        keras.config.set_dtype_policy("float32")
        keras.utils.set_random_seed(0)
        model = build()
        model(X[:2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared, opt = tfmp.prepare(model, keras.optimizers.Adam(1e-2), precision,
                                         hardware=GPU)
        compute = {l.name: l.compute_dtype for l in prepared._flatten_layers(include_self=False)}
        wanted = (expected if build is _norms_model else
                  {k: expected[k] for k in ("ln", "half_norm", "head")})
        got = {name: compute.get(name) for name in wanted}
        assert got == wanted, (build, got)
        report = tfmp.audit(prepared, opt, hardware=GPU)
        assert report.ok and "normalization-half" not in report.codes(), str(report)
        run = tfmp.rewrite.run_model(prepared)
        ln = next(l for l in run.layers if l.class_name == "LayerNormalization")
        assert ln.output_dtypes == (half,)  # a 16-bit tensor, its statistics float32 inside
        prepared.compile(opt, "mse")
        hist = prepared.fit(X[:64], np.zeros((64, 2)), batch_size=32, epochs=1, verbose=0)
        assert np.isfinite(hist.history["loss"][-1])
