"""tfmp.save_weights / load_weights / weights.save_model and HalfPrecisionCheckpoint: real
files, real Keras loading, real fit."""

import os
import signal
import subprocess
import sys
import time

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

import models
import tfmp
from helpers import ROOT
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
    ([[1e-9, 0.0], [-2e-9, 0.0]], "every nonzero value is below 2.98e-08"),
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
    with h5py.File(path, "r+") as f:  # one value changed behind the checksum's back
        data = f["layers/dense/vars/1"]  # Keras' layout: by class, not by layer name
        data[0] = data[0] + 1
    with pytest.raises(WeightsFileError, match="is damaged: its checksum does not match"):
        tfmp.load_weights(_build("mlp", hidden=(32, 32)), str(path))
    with pytest.raises(WeightsFileError, match="no such file"):
        tfmp.load_weights(small, str(tmp_path / "none.weights.h5"))


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


def test_a_keras_archive_with_16_bit_weights_loads_with_keras(tmp_path):
    model = _build("mlp", "mixed_bfloat16")
    model.compile("adam", "sparse_categorical_crossentropy")
    report = save_model(model, str(tmp_path / "release.keras"), "bfloat16")
    assert report.size_ratio < 0.7  # the config is a fixed part of the archive
    loaded = keras.models.load_model(tmp_path / "release.keras")
    assert loaded.compiled and tfmp.rewrite.model_policy(loaded) == "mixed_bfloat16"
    for a, b in zip(_rounded(model.get_weights(), "bfloat16"), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


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
    model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[every, best, never, backup])
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
import sys
import numpy as np, keras, tfmp
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(2048), keras.layers.Dense(512)])
i = 0
while True:
    model.layers[0].kernel.assign(np.full((512, 2048), i % 7, np.float32))
    tfmp.save_weights(model, sys.argv[1], "bfloat16")
    i += 1
    print(i, flush=True)
"""


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "w.weights.h5"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "1"  # one complete file, then more writes
        time.sleep(0.7)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(2048),
                              keras.layers.Dense(512)])
    assert tfmp.load_weights(model, str(path)) == "bfloat16"  # complete, checksum and all
    kernel = model.layers[0].kernel.numpy()
    assert np.unique(kernel).size == 1 and 0 <= kernel[0, 0] < 7
