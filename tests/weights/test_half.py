"""tfmp.save_weights / load_weights / weights.save_model and HalfPrecisionCheckpoint: real
files, real Keras loading, real fit."""

import logging
import os
import signal
import warnings

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

import models
import tfmp
from helpers import ROOT, zygote
from tfmp.callbacks import HalfPrecisionCheckpoint
from tfmp.weights import WeightsFileError, save_model

ROUND = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def _rounded(weights, dtype):
    return [np.asarray(w, np.float32).astype(ROUND[dtype]).astype(np.float32) for w in weights]


def _build(name, policy="float32", seed=0, **kwargs):
    with tfmp.policy_scope(policy):
        keras.utils.set_random_seed(seed)
        return models.get(name)[0](**kwargs)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_reference_models_round_trip_at_half_size_under_every_policy(name, tmp_path):
    model = _build(name)
    if name == "cnn":  # BatchNormalization's statistics are part of what is saved
        x = np.random.RandomState(0).rand(8, 32, 32, 3).astype("float32")
        model(x, training=True)
        for layer in model.layers:
            for v in layer.non_trainable_weights:
                v.assign(v + 0.25)  # away from their initial values: a reload must move them
    keras_file = tmp_path / "keras.weights.h5"
    model.save_weights(keras_file)  # Keras' own float32 file
    for dtype in ("bfloat16", "float16"):
        path = tmp_path / f"{name}.{dtype}.weights.h5"
        report = tfmp.save_weights(model, str(path), dtype)
        assert report.size_bytes == path.stat().st_size and report.kept_float32 == {}
        assert report.size_ratio <= 0.55, report  # vs the same file in float32
        assert path.stat().st_size <= 0.55 * keras_file.stat().st_size
        expected = _rounded(model.get_weights(), dtype)
        for policy in POLICIES:
            other = _build(name, policy, seed=1)  # other initial values
            assert tfmp.load_weights(other, str(path)) == dtype
            for a, b in zip(expected, other.get_weights()):
                np.testing.assert_array_equal(a, b)
        plain = _build(name, "mixed_bfloat16", seed=2)
        plain.load_weights(path)  # Keras' own loader reads the 16-bit HDF5 types as float32
        for a, b in zip(expected, plain.get_weights()):
            np.testing.assert_array_equal(a, b)


def _one_dense(values, name="big"):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name=name)])
    model.layers[0].kernel.assign(np.asarray(values, np.float32))
    return model


@pytest.mark.parametrize("values,why", [
    ([[1.0, 2.0], [7e4, 3.0]], "values up to 7e+04, past float16's 65504"),
    ([[1e-9, 0.0], [-2.0**-25, 0.0]], "every nonzero value is at most 2.98e-08"),
])
def test_a_variable_float16_cannot_hold_is_refused_or_kept(values, why, tmp_path):
    model = _one_dense(values)
    path = tmp_path / "w.weights.h5"
    with pytest.raises(WeightsFileError) as caught:
        tfmp.save_weights(model, str(path), "float16")
    message = str(caught.value)
    assert "big/kernel'" in message and why in message and "\n" not in message
    assert not path.exists()  # nothing written
    report = tfmp.save_weights(model, str(path), "float16", keep_float32="overflow")
    (kept, reason), = report.kept_float32.items()
    assert kept.endswith("big/kernel") and why in reason
    other = _one_dense(np.zeros((2, 2)))
    tfmp.load_weights(other, str(path))
    np.testing.assert_array_equal(other.layers[0].kernel.numpy(), np.asarray(values, np.float32))
    tfmp.save_weights(model, str(path), "bfloat16")  # bfloat16 holds both


def test_a_file_for_another_architecture_or_a_damaged_one_is_refused_in_one_line(tmp_path):
    small = _build("mlp", hidden=(32, 32))
    path = tmp_path / "small.weights.h5"
    tfmp.save_weights(small, str(path), "bfloat16")
    wide = _build("mlp", hidden=(48, 32))
    before = wide.get_weights()
    with pytest.raises(WeightsFileError, match="variable 'dense_0/kernel' is of shape "
                       r"\(64, 32\) where the model has \(64, 48\)") as caught:
        tfmp.load_weights(wide, str(path))
    assert "\n" not in str(caught.value)
    deeper = _build("mlp", hidden=(32, 32, 32))
    with pytest.raises(WeightsFileError, match="variable 'dense_2/kernel' is missing"):
        tfmp.load_weights(deeper, str(path))
    shallow = _build("mlp", hidden=(32,))
    with pytest.raises(WeightsFileError, match="holds 2 variable\\(s\\) the model has not"):
        tfmp.load_weights(shallow, str(path))
    for a, b in zip(before, wide.get_weights()):  # nothing loaded
        np.testing.assert_array_equal(a, b)
    tfmp.save_weights(small, str(tmp_path / "copy.weights.h5"), "bfloat16")
    with h5py.File(path, "r+") as f:  # one value changed behind the checksum's back
        data = f["layers/dense/vars/1"]  # Keras' layout: by class, not by layer name
        data[0] = data[0] + 1
    with pytest.raises(WeightsFileError, match="is damaged: its checksum does not match"):
        tfmp.load_weights(_build("mlp", hidden=(32, 32)), str(path))
    with h5py.File(tmp_path / "copy.weights.h5", "r+") as f:  # two same-shape arrays swapped
        first, second = f["layers/dense/vars/1"][()], f["layers/dense_1/vars/1"][()]
        del f["layers/dense/vars/1"], f["layers/dense_1/vars/1"]
        f["layers/dense/vars/1"], f["layers/dense_1/vars/1"] = second, first
    with pytest.raises(WeightsFileError, match="is damaged"):
        tfmp.load_weights(_build("mlp", hidden=(32, 32)), str(tmp_path / "copy.weights.h5"))
    tfmp.save_weights(small, str(tmp_path / "renamed.weights.h5"), "bfloat16")
    with h5py.File(tmp_path / "renamed.weights.h5", "r+") as f:  # same data, another name
        f.move("layers/dense/vars/1", "layers/dense/vars/1x")
    with pytest.raises(WeightsFileError, match="is damaged"):
        tfmp.load_weights(_build("mlp", hidden=(32, 32)), str(tmp_path / "renamed.weights.h5"))
    with pytest.raises(WeightsFileError, match="no such file"):
        tfmp.load_weights(small, str(tmp_path / "none.weights.h5"))


def test_the_first_misfit_is_named_in_model_order_by_structure(tmp_path):
    def build(units):  # fresh BatchNormalizations: gamma and moving_variance are equal arrays
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d0"),
                                 keras.layers.BatchNormalization(name="bn0"),
                                 keras.layers.Dense(units, name="d1"),
                                 keras.layers.BatchNormalization(name="bn1")])
    path = tmp_path / "w.weights.h5"
    tfmp.save_weights(build(3), str(path))
    with pytest.raises(WeightsFileError, match=r"variable 'sequential\S*d1/kernel' is of shape "
                       r"\(4, 3\) where the model has \(4, 5\)"):
        tfmp.load_weights(build(5), str(path))


@keras.saving.register_keras_serializable("tfmp_weights_tests")
class Counter(keras.layers.Layer):
    """A float scalar, an integer step counter and a float64 vector beside a kernel."""

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], 2), initializer="glorot_uniform")
        self.scale = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.1))
        self.steps = self.add_weight(shape=(), dtype="int64", trainable=False,
                                     initializer=keras.initializers.Constant(2**40 + 1))
        self.wide = self.add_weight(shape=(3,), dtype="float64", trainable=False,
                                    initializer=keras.initializers.Constant(1 / 3))

    def call(self, x):
        return ops.matmul(x, self.kernel) * self.scale


def test_scalars_integers_and_float64_survive(tmp_path):
    def build():
        return keras.Sequential([keras.Input((4,)), Counter(name="counter")])
    model = build()
    path = tmp_path / "w.weights.h5"
    tfmp.save_weights(model, str(path), "bfloat16")
    other = build()
    for v in other.weights:
        v.assign(keras.ops.zeros_like(v))
    tfmp.load_weights(other, str(path))
    layer = other.get_layer("counter")
    assert int(layer.steps.numpy()) == 2**40 + 1  # not rounded: only float32 arrays are
    assert layer.wide.numpy().dtype == np.float64
    np.testing.assert_array_equal(layer.wide.numpy(), model.get_layer("counter").wide.numpy())
    assert float(layer.scale.numpy()) == float(np.float32(0.1).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(layer.kernel.numpy(),
                                  _rounded([model.get_layer("counter").kernel.numpy()],
                                           "bfloat16")[0])


def test_a_nested_compiled_models_optimizer_is_not_released(tmp_path):
    def build():
        keras.utils.set_random_seed(0)
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="inner")
        inner.compile(keras.optimizers.Adam(), "mse")
        inner.fit(np.ones((4, 4)), np.ones((4, 3)), verbose=0)  # Adam's state: tiny values
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    model = build()
    path = tmp_path / "w.weights.h5"
    tfmp.save_weights(model, str(path), "float16")  # Adam's velocities would be refused
    with h5py.File(path) as f:
        names = []
        f.visit(names.append)
    assert not any("optimizer" in n.split("/") for n in names), names
    rebuilt = keras.Model.from_config(model.get_config())  # uncompiled
    assert tfmp.load_weights(rebuilt, str(path)) == "float16"


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "int8"}, "dtype='int8' is not accepted; use one of bfloat16, float16"),
    ({"keep_float32": "all"}, "keep_float32='all' is not accepted"),
    ({"path": "w.h5"}, "must end in .weights.h5"),
    ({"path": "/no/such/dir/w.weights.h5"}, "does not exist"),
])
def test_bad_arguments_are_one_line(kwargs, message, tmp_path):
    args = {"path": str(tmp_path / "w.weights.h5"), "dtype": "bfloat16", **kwargs}
    with pytest.raises(WeightsFileError, match=message):
        tfmp.save_weights(_one_dense([[1, 2], [3, 4]]), args.pop("path"), **args)


def test_a_keras_archive_with_16_bit_weights_loads_with_keras_without_a_warning(tmp_path, caplog):
    model = _build("mlp", "mixed_bfloat16")
    model.compile("adam", "sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)  # as after training: 14 variables
    model.set_weights(_rounded(model.get_weights(), "bfloat16"))  # what the archive holds
    report = save_model(model, str(tmp_path / "release.keras"), "bfloat16")
    assert report.size_ratio < 0.7  # the config is a fixed part of the archive
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(tmp_path / "release.keras")
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "optimizer" in m or "Skipping" in m], said
    assert not loaded.compiled and tfmp.rewrite.classify.model_policy(loaded) == "mixed_bfloat16"
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.RandomState(0).rand(8, *model.input_shape[1:]).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))


def test_checkpoint_callback_every_epoch_and_best_only_beside_float32_backups(tmp_path):
    x = np.random.RandomState(0).rand(128, 8).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    every = HalfPrecisionCheckpoint(str(tmp_path / "ep{epoch:02d}.weights.h5"), "float16",
                                    monitor="loss")
    best = HalfPrecisionCheckpoint(str(tmp_path / "best.weights.h5"), "bfloat16", monitor="loss",
                                   save_best_only=True)
    never = HalfPrecisionCheckpoint(str(tmp_path / "never.weights.h5"), "bfloat16",
                                    monitor="loss", save_best_only=True,
                                    initial_value_threshold=0.0)  # no loss is below 0
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append((logs["loss"], model.get_weights())))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0,
              callbacks=[every, best, never, backup, record])
    best_weights = min(seen, key=lambda item: item[0])[1]
    restored = keras.models.clone_model(model)
    tfmp.load_weights(restored, str(tmp_path / "best.weights.h5"))
    for a, b in zip(_rounded(best_weights, "bfloat16"), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["backup", "best.weights.h5", "ep01.weights.h5",
                                            "ep02.weights.h5", "ep03.weights.h5"]
    with h5py.File(tmp_path / "ep03.weights.h5") as f:
        assert f["layers/dense/vars/0"].id.get_type().get_size() == 2  # 16 bits on disk
    backups = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "backup") for f in fs
               if f.endswith(".h5")]
    with h5py.File(backups[0]) as f:  # Keras' float32 backup, untouched
        assert f["layers/dense/vars/0"].dtype == np.float32
    last = keras.models.clone_model(model)
    assert tfmp.load_weights(last, str(tmp_path / "ep03.weights.h5")) == "float16"
    for a, b in zip(_rounded(model.get_weights(), "float16"), last.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"must end in `\.weights\.h5`"):
        HalfPrecisionCheckpoint(str(tmp_path / "x.keras"))
    with pytest.raises(WeightsFileError, match="dtype='fp8' is not accepted"):
        HalfPrecisionCheckpoint(str(tmp_path / "x.weights.h5"), "fp8")


WRITER = """
import os, signal, sys
import numpy as np, keras, tfmp
from tfmp.weights import layout
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(8)])
model.layers[0].kernel.assign(np.full((64, 256), 3.0, np.float32))
tfmp.save_weights(model, sys.argv[1], "bfloat16")  # the previous file: complete
model.layers[0].kernel.assign(np.full((64, 256), 5.0, np.float32))
write = layout.write_release

def killed_midway(source, target, dtype, keep):
    target.create_dataset("layers/dense/vars/0", data=np.zeros((64, 256), np.float32))
    target.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 during the write

layout.write_release = killed_midway
import tfmp.weights.half as half
half.write_release = killed_midway
tfmp.save_weights(model, sys.argv[1], "bfloat16")
"""


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "w.weights.h5"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    child = zygote().run(["-c", WRITER, str(path)], env=env, timeout=120)  # a process of its own
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    left = set(os.listdir(tmp_path)) - {"w.weights.h5"}
    assert "w.weights.h5" in os.listdir(tmp_path)
    assert all(name.startswith(".w.weights.h5.tmp-") for name in left), left  # hidden leftovers
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(8)])
    assert tfmp.load_weights(model, str(path)) == "bfloat16"  # complete, checksum and all
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), np.full((64, 256), 3.0))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_export_modes_write_the_dtype_they_name(dtype, tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    kernel = (1 / 3 + np.arange(12).reshape(4, 3) * 1e-3).astype(np.float32)
    model.get_layer("d").kernel.assign(kernel)
    path = tmp_path / "m.keras"
    tfmp.export(model, str(path), f"keras_{dtype}")
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("d").kernel.numpy(),
                                  kernel.astype(ROUND[dtype]).astype(np.float32))


def test_bfloat16_weights_are_released_losslessly(tmp_path):
    # tfmp.prepare(..., weights_dtype="bfloat16"): the 16-bit layers' variables are bfloat16
    # already, so the release file holds them bit for bit (the float32 head is rounded).
    model, _ = tfmp.prepare(_build("mlp", hidden=(16,)), "adam", "bf16",
                            weights_dtype="bfloat16")
    assert [v.dtype for v in model.weights] == ["bfloat16"] * 2 + ["float32"] * 2
    path = str(tmp_path / "bf16.weights.h5")
    tfmp.save_weights(model, path, "bfloat16")
    other = _build("mlp", seed=1, hidden=(16,))
    assert tfmp.load_weights(other, path) == "bfloat16"
    for variable, loaded in zip(model.weights[:2], other.get_weights()[:2]):
        np.testing.assert_array_equal(np.asarray(variable.numpy(), np.float32), loaded)
