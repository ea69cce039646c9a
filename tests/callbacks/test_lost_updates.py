"""LossScaleMonitor and 16-bit weights (tfmp.callbacks.lost_updates): the share of updates
lost to rounding in the logs, TensorBoard and the summary, and the warnings that name the fix."""

import glob
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import make_data
from tfmp.callbacks import LossScaleMonitor
from tfmp.callbacks.lost_updates import lost_updates_warning, uncompensated_half_weights
from tfmp.compensation import compensate


def _fit(optimizer, tmp_path, epochs=3, **monitor_args):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu", dtype="bfloat16"),
        keras.layers.Dense(1, dtype="float32"),
    ])
    model.compile(optimizer, "mse")
    monitor = LossScaleMonitor(tensorboard_dir=str(tmp_path / "tb"), **monitor_args)
    x, y = make_data(128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[monitor])
    said = [str(w.message) for w in caught if "16-bit" in str(w.message)]
    return history.history, monitor, said


def _tags(directory):
    tags = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                    else value.simple_value)
    return tags


def test_lost_updates_are_shown_and_warned_with_nearest_rounding(tmp_path):
    opt = compensate(keras.optimizers.Adam(1e-5), rounding="nearest", lost_updates_every=2)
    history, monitor, said = _fit(opt, tmp_path)
    assert min(history["lost_updates"]) > 0.5
    assert monitor.summary["lost_updates"] == pytest.approx(opt.lost_updates)
    assert monitor.summary["lost_updates"] > 0.5
    assert len(said) == 1 and "were lost to rounding" in said[0]
    assert "rounding='stochastic' or 'kahan'" in said[0] and "(rounding='nearest')" in said[0]
    assert max(_tags(str(tmp_path / "tb"))["lost_updates"]) > 0.5


def test_kahan_loses_almost_nothing_and_says_nothing(tmp_path):
    opt = compensate(keras.optimizers.Adam(1e-5), rounding="kahan", lost_updates_every=2)
    history, monitor, said = _fit(opt, tmp_path)
    assert max(history["lost_updates"]) < 0.1
    assert monitor.summary["lost_updates"] < 0.1 and not said
    assert "lost_updates" in _tags(str(tmp_path / "tb"))


def test_stochastic_rounding_reports_no_figure_it_does_not_measure(tmp_path):
    opt = compensate(keras.optimizers.Adam(1e-5), rounding="stochastic", lost_updates_every=2)
    history, monitor, said = _fit(opt, tmp_path, epochs=1)
    assert "lost_updates" not in history and monitor.summary["lost_updates"] is None
    assert opt.lost_updates is None and not said
    with pytest.raises(ValueError, match="measures no lost updates .rounding='stochastic'"):
        opt.lost_updates_share()


def test_the_advice_fits_the_weights_dtype():
    float16 = keras.Variable(np.ones((4,), "float32"), dtype="float16", name="w")
    for rounding, fix in (("nearest", "rounding='kahan'"), ("kahan", "raise the learning rate")):
        opt = compensate(keras.optimizers.Adam(), rounding=rounding)
        opt.build([float16])
        said = lost_updates_warning(opt, 0.5, 7)
        assert fix in said and "stochastic" not in said, said
        assert said.startswith(f"tfmp: 50% of the updates of 16-bit weights were lost to "
                               f"rounding at step 7 (rounding={rounding!r})")
    opt = compensate(keras.optimizers.Adam(), rounding="kahan")
    opt.build([keras.Variable(np.ones((4,), "float32"), dtype="bfloat16")])
    assert "use rounding='stochastic'" in lost_updates_warning(opt, 0.5, 7)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, dtype="float16")])
    model.compile(keras.optimizers.Adam(), "mse")
    said = uncompensated_half_weights(model)
    assert "weights_dtype='float16'" in said and "rounding='kahan'" in said


def test_stock_keras_on_16_bit_weights_is_warned_at_the_start(tmp_path):
    history, monitor, said = _fit(keras.optimizers.Adam(1e-5), tmp_path, epochs=1)
    assert "lost_updates" not in history and monitor.summary["lost_updates"] is None
    assert len(said) == 1 and "Adam updates them in 16 bits" in said[0]
    assert "dense/kernel" in said[0] and "tfmp.compensate(optimizer)" in said[0]


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.1", float("nan")])
def test_a_bad_lost_warn_is_refused(value):
    with pytest.raises(ValueError, match="lost_warn"):
        LossScaleMonitor(lost_warn=value)
