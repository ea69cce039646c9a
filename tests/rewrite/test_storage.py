"""tfmp.prepare(..., weights_dtype=...): 16-bit weights where the model computes in 16 bits."""

import keras
import numpy as np
import pytest

import tfmp
from tfmp.compensation import CompensatedOptimizer
from tfmp.compensation.optimizer import DEFAULT_ROUNDING
from tfmp.precision import HardwareInfo

HW = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))
rng = np.random.RandomState(0)
X = rng.rand(256, 16).astype("float32")
Y = (X[:, :8].sum(1) > X[:, 8:].sum(1)).astype("int32")


class Net(keras.Model):
    """A subclassed model (converted in place): hidden Dense, LayerNorm, softmax head."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(32, activation="relu", name="hidden")
        self.norm = keras.layers.LayerNormalization(name="norm")
        self.head = keras.layers.Dense(2, activation="softmax", name="head")

    def call(self, x):
        return self.head(self.norm(self.hidden(x)))


def _sequential():
    return keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu",
                                                                   name="hidden"),
                             keras.layers.LayerNormalization(name="norm"),
                             keras.layers.Dense(2, activation="softmax", name="head")])


def _functional():
    x = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    h = keras.layers.BatchNormalization(name="norm")(h)
    return keras.Model(x, keras.layers.Dense(2, activation="softmax", name="head")(h))


def _subclassed():
    model = Net()
    model(X[:2])
    return model


def _float32_model(build):
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    return build()


def _dtypes(model):
    return {"/".join(v.path.split("/")[-2:]): v.dtype for v in model.weights}


def _layer(model, name):
    return next(l for l in model._flatten_layers(include_self=False) if l.name == name)


@pytest.mark.parametrize("build", [_sequential, _functional, _subclassed])
def test_16_bit_layers_store_their_weights_in_bfloat16_and_the_model_trains(build):
    model, opt = tfmp.prepare(_float32_model(build), keras.optimizers.Adam(1e-2),
                              "mixed_bfloat16", hardware=HW, guard=True,
                              weights_dtype="bfloat16")
    hidden, norm, head = (_layer(model, n) for n in ("hidden", "norm", "head"))
    assert [v.dtype for v in hidden.weights] == ["bfloat16"] * 2
    assert hidden.dtype_policy.name == "bfloat16"  # no autocast; a .keras file makes bf16 variables
    assert {v.dtype for v in norm.weights + head.weights} == {"float32"}  # moving stats too
    assert (head.compute_dtype, norm.compute_dtype) == ("float32", norm.compute_dtype)
    inner = opt.inner_optimizer  # guard: the loss-scale optimizer outside, compensated inside
    assert isinstance(inner, CompensatedOptimizer) and inner.rounding == DEFAULT_ROUNDING
    report = tfmp.audit(model, opt, hardware=HW)
    assert report.ok and "variables-compensated" in report.codes(), str(report)
    model.compile(opt, "sparse_categorical_crossentropy")
    before = np.asarray(hidden.kernel.numpy(), "float32")
    hist = model.fit(X, Y, epochs=3, batch_size=32, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0] * 0.8
    assert hidden.kernel.dtype == "bfloat16" and head.kernel.dtype == "float32"
    assert not np.array_equal(np.asarray(hidden.kernel.numpy(), "float32"), before)
    if inner.rounding == "stochastic":  # loses none in expectation: not measured
        assert inner.lost_updates is None
    else:
        assert 0.0 <= inner.lost_updates < 0.2


def test_float16_weights_under_mixed_float16_use_a_kahan_buffer():
    model, opt = tfmp.prepare(_float32_model(_sequential), keras.optimizers.Adam(1e-2),
                              "mixed_float16", hardware=HW, weights_dtype="float16")
    assert _layer(model, "hidden").kernel.dtype == "float16"
    assert isinstance(opt, tfmp.DynamicLossScaleOptimizer)
    assert opt.inner_optimizer.rounding == "kahan"
    model.compile(opt, "sparse_categorical_crossentropy")
    hist = model.fit(X, Y, epochs=2, batch_size=32, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    assert hist.history["loss"][-1] < hist.history["loss"][0]


def test_a_model_built_under_bfloat16_is_taken_as_it_is():
    keras.config.set_dtype_policy("bfloat16")
    keras.utils.set_random_seed(0)
    original = _sequential()
    weights = [np.asarray(w, "float32") for w in original.get_weights()]
    model, _ = tfmp.prepare(original, "adam", "mixed_bfloat16", hardware=HW,
                            weights_dtype="bfloat16")
    assert _dtypes(model) == {"hidden/kernel": "bfloat16", "hidden/bias": "bfloat16",
                              "norm/gamma": "float32", "norm/beta": "float32",
                              "head/kernel": "float32", "head/bias": "float32"}
    for a, b in zip(weights, model.get_weights()):  # bfloat16 -> float32 is exact
        np.testing.assert_array_equal(a, np.asarray(b, "float32"))


@pytest.mark.parametrize("precision, weights_dtype, fragment", [
    ("float32", "bfloat16", "weights_dtype='bfloat16' does not fit the policy float32 (it "
                            "computes in float32); use None"),
    ("mixed_bfloat16", "float16", "weights_dtype='float16' does not fit the policy "
                                  "mixed_bfloat16 (it computes in bfloat16)"),
    ("mixed_bfloat16", "float32", "weights_dtype='float32' is not accepted; use None (float32 "
                                  "weights), 'bfloat16' (under mixed_bfloat16) or 'float16' "
                                  "(under mixed_float16)"),
    ("mixed_bfloat16", 16, "weights_dtype=16 is not accepted"),
])
def test_a_weights_dtype_the_policy_does_not_compute_in_is_refused(precision, weights_dtype,
                                                                   fragment):
    model, optimizer = _float32_model(_subclassed), keras.optimizers.Adam()
    weights = [(v.dtype, v.numpy()) for v in model.weights]
    with pytest.raises(ValueError) as error:
        tfmp.prepare(model, optimizer, precision, hardware=HW, weights_dtype=weights_dtype)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert type(optimizer) is keras.optimizers.Adam
    assert keras.config.dtype_policy().name == "float32"
    assert {l.dtype_policy.name for l in model._flatten_layers()} == {"float32"}
    for (dtype, value), v in zip(weights, model.weights):
        assert v.dtype == dtype and np.array_equal(v.numpy(), value)


def test_an_error_after_the_weights_were_stored_gives_everything_back(monkeypatch):
    # A model converted in place: its variables themselves (not a copy's) went to bfloat16.
    model, optimizer = _float32_model(_subclassed), keras.optimizers.Adam()
    values = [v.numpy() for v in model.weights]
    backing = [v.value for v in model.weights]

    def failing_audit(converted, opt, *args, **kwargs):
        assert converted is model and model.hidden.kernel.dtype == "bfloat16"
        assert isinstance(opt, CompensatedOptimizer)
        raise RuntimeError("the audit failed")

    monkeypatch.setattr(tfmp.preparation, "audit", failing_audit)
    with pytest.raises(RuntimeError, match="the audit failed"):
        tfmp.prepare(model, optimizer, "mixed_bfloat16", hardware=HW,
                     weights_dtype="bfloat16")
    assert type(optimizer) is keras.optimizers.Adam
    assert {l.dtype_policy.name for l in model._flatten_layers()} == {"float32"}
    for v, value, tf_variable in zip(model.weights, values, backing):
        assert v.dtype == "float32" and v.value is tf_variable
        np.testing.assert_array_equal(v.numpy(), value)  # float32 bits, not bfloat16 ones


def test_saved_and_loaded_with_its_16_bit_weights(tmp_path):
    model, opt = tfmp.prepare(_float32_model(_functional), keras.optimizers.Adam(1e-2),
                              "mixed_bfloat16", hardware=HW, weights_dtype="bfloat16")
    model.compile(opt, "sparse_categorical_crossentropy")
    model.fit(X[:64], Y[:64], batch_size=32, verbose=0)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert _dtypes(loaded) == _dtypes(model) and _dtypes(model)["hidden/kernel"] == "bfloat16"
    assert isinstance(loaded.optimizer, CompensatedOptimizer)
    again, _ = tfmp.prepare(_float32_model(_functional), "adam", "mixed_bfloat16",
                            hardware=HW, weights_dtype="bfloat16")
    again.load_weights(tmp_path / "m.weights.h5")
    for other in (loaded, again):
        for a, b in zip(model.weights, other.weights):
            np.testing.assert_array_equal(np.asarray(a.numpy(), "float32"),
                                          np.asarray(b.numpy(), "float32"))
