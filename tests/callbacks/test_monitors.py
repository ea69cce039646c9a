"""LossScaleMonitor and NanMonitor in real model.fit runs."""

import csv
import glob
import logging as py_logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from helpers import make_data, mirrored
from tfmp.callbacks import LossScaleMonitor, NanMonitor


class GradientSpike(keras.layers.Layer):
    """Identity forward; at the chosen training calls its gradient is inf (a float16 overflow)."""

    def __init__(self, spike_calls, **kwargs):
        super().__init__(**kwargs)
        self.spike_list = sorted(spike_calls)
        self.spike_calls = tf.constant(self.spike_list or [-1], tf.int32)
        self.calls = tf.Variable(0, dtype=tf.int32, trainable=False)  # not a model weight

    def call(self, x, training=None):
        if not training:
            return x
        spike = tf.reduce_any(tf.equal(self.calls, self.spike_calls))
        self.calls.assign_add(1)

        @tf.custom_gradient
        def identity(t):
            def grad(dy):
                return tf.where(spike, dy * tf.cast(np.inf, dy.dtype), dy)
            return tf.identity(t), grad

        return identity(x)

    def get_config(self):
        return {**super().get_config(), "spike_calls": self.spike_list}


class Recorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.batches, self.summary = [], None

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs))

    def on_train_end(self, logs=None):
        self.summary = (logs or {}).get("tfmp_summary")


def make_model(spikes=()):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             GradientSpike(spikes), keras.layers.Dense(1, dtype="float32")])


def compile_fp16(model, **scale_args):
    scale_args.setdefault("initial_scale", 2.0**10)
    opt = tfmp.wrap_optimizer(keras.optimizers.Adam(1e-2), "mixed_float16", **scale_args)
    model.compile(opt, "mse")
    return opt


def test_injected_overflow_is_counted_logged_and_recovered(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(128)
    model = make_model(spikes={2, 3, 9})
    opt = compile_fp16(model, growth_interval=3)
    csv_path, tb_dir = str(tmp_path / "log.csv"), str(tmp_path / "tb")
    rec, nan = Recorder(), NanMonitor("stop")
    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False, callbacks=[
        LossScaleMonitor(warn_below=0.0, tensorboard_dir=str(tmp_path / "own")), nan, rec,
        keras.callbacks.CSVLogger(csv_path), keras.callbacks.TensorBoard(tb_dir)])
    assert hist.epoch == [0, 1]  # completed: overflow is not a reason to stop
    assert int(opt.skipped_steps.numpy()) == 3 and nan.overflow_steps == 3 and not nan.events
    scales = [b["loss_scale"] for b in rec.batches]
    assert [b["skipped_steps"] for b in rec.batches][:5] == [0, 0, 1, 2, 2]
    assert rec.batches[-1]["skipped_steps"] == 3
    assert scales[:6] == [1024.0, 1024.0, 512.0, 256.0, 256.0, 256.0]
    assert scales[6] == 512.0  # regrew after growth_interval=3 clean steps
    assert hist.history["skipped_steps"] == [2, 3]
    assert hist.history["loss_scale"][-1] == opt.loss_scale
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["skipped_steps"]) for r in rows] == [2, 3]
    assert float(rows[-1]["loss_scale"]) == opt.loss_scale
    for directory in (os.path.join(tb_dir, "train"), str(tmp_path / "own")):
        tags = set()
        for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                tags |= {v.tag for v in event.summary.value}
        assert {"epoch_loss_scale", "epoch_skipped_steps"} <= tags or \
               {"loss_scale", "skipped_steps"} <= tags, (directory, tags)


def test_summary_line_and_logs(caplog):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    model = make_model(spikes={1})
    compile_fp16(model)
    monitor, rec = LossScaleMonitor(warn_below=0.0), Recorder()
    with caplog.at_level(py_logging.INFO, logger="absl"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[monitor, rec])
    s = monitor.summary
    assert rec.summary == s
    assert s["policy"] == "mixed_float16" and s["steps"] == 4
    assert (s["loss_scale_start"], s["loss_scale_min"], s["loss_scale_end"]) == (1024.0, 512.0, 512.0)
    assert s["overflow_steps_skipped"] == 1 and s["overflow_share"] == 0.25 and s["nan_losses"] == 0
    lines = [r.getMessage() for r in caplog.records if "tfmp summary" in r.getMessage()]
    assert lines == ["tfmp summary: policy=mixed_float16 loss_scale start=1024 end=512 min=512, "
                     "overflow steps skipped=1 (25.00% of 4), NaN losses=0"]


def test_low_scale_and_repeated_backoff_warn_once():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(128)
    model = make_model(spikes={1, 2, 3, 4})
    compile_fp16(model)
    with pytest.warns(RuntimeWarning) as record:
        model.fit(x, y, epochs=1, batch_size=16, verbose=0,
                  callbacks=[LossScaleMonitor(warn_below=100.0, backoff_warn=3)])
    messages = [str(w.message) for w in record if "tfmp" in str(w.message)]
    assert sum("below 100" in m for m in messages) == 1
    assert sum("backed off 3 times" in m for m in messages) == 1
    assert all("first non-finite variable: sequential/dense/" in m for m in messages)


def _poisoned(n=64):
    x, y = make_data(n)
    x[21, 2] = np.nan  # batch 1 of each epoch (batch size 16)
    return x, y


def test_nan_data_stop_names_data_not_overflow(caplog):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _poisoned()
    model = make_model()
    opt = compile_fp16(model)
    nan = NanMonitor("stop")
    with caplog.at_level(py_logging.ERROR, logger="absl"):
        hist = model.fit(x, y, epochs=5, batch_size=16, verbose=0, shuffle=False, callbacks=[nan])
    assert hist.epoch == [0]  # stopped in the first epoch
    event = nan.stopped_event
    assert (event.kind, event.trigger) == ("data", "nonfinite_loss")
    assert (event.epoch, event.batch, event.step) == (0, 1, 2)
    assert "bad input data" in event.cause and "check the data" in event.fix
    # the bad batch, run again: its inputs hold the NaN, no layer is to blame
    assert event.bad_inputs and event.first_nonfinite_layer is None
    assert "the batch itself holds inf/NaN" in event.message()
    assert nan.overflow_steps == 0
    assert event.first_nonfinite_variable == opt.first_nonfinite_variable
    errors = [r.getMessage() for r in caplog.records if "Training stopped" in r.getMessage()]
    assert len(errors) == 1 and "non-finite loss" not in errors[0] and "nonfinite loss" in errors[0]
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_bad_data_is_diagnosed_as_bad_data_not_divergence():
    from tfmp.callbacks.events import Evidence, diagnose
    kind, cause, fix = diagnose(Evidence("nonfinite_loss", "float16", "d/kernel",
                                         bad_inputs=True, float32_finite=False))
    assert kind == "data" and cause.startswith("the batch itself holds inf/NaN")
    assert "learning rate" not in fix
    kind, cause, fix = diagnose(Evidence("nonfinite_loss", "float16", "d/kernel",
                                         bad_inputs=False, layer="energy", float32_finite=True))
    assert kind == "precision" and cause.startswith("energy made inf/NaN")
    assert "float32_layers=['energy']" in fix


def test_the_event_names_the_layer_that_overflows_float16():
    from rewrite.overflow_models import Energy, functional, task
    model, opt = tfmp.prepare(functional(Energy(name="energy")), "adam", "fp16",
                              hardware=tfmp.HardwareInfo("gpu", ("GPU:0",), ((7, 5),)))
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = task(64)
    nan = NanMonitor("stop")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[nan])
    event = nan.stopped_event
    assert (event.kind, event.trigger) == ("precision", "nonfinite_loss")
    assert event.first_nonfinite_layer == "energy"
    assert not event.bad_inputs
    assert "float32_layers=['energy']" in event.fix and "energy" in event.cause
    assert "first layer to go non-finite=energy" in event.message()


def test_a_clean_run_keeps_no_batch_and_a_skipped_step_keeps_its_own():
    from tfmp.callbacks.culprit import last_bad_batch
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    model = make_model(spikes={2})  # an injected gradient overflow at step 2 only
    compile_fp16(model)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False,
              callbacks=[NanMonitor("skip")])
    kept = last_bad_batch(model)
    assert kept is not None  # the batch of the skipped step, and only that one
    np.testing.assert_array_equal(kept[0], x[32:48])
    clean = make_model()
    compile_fp16(clean)
    clean.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[NanMonitor("skip")])
    assert last_bad_batch(clean) is None


def test_nan_data_raise_carries_the_facts():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _poisoned()
    model = make_model()
    compile_fp16(model)
    with pytest.raises(tfmp.NonFiniteError) as err:
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False,
                  callbacks=[NanMonitor("raise")])
    e = err.value.event
    assert (e.kind, e.trigger, e.epoch, e.batch, e.step, e.skipped_steps) == (
        "data", "nonfinite_loss", 0, 1, 2, 1)
    assert e.loss_scale == 512.0 and e.first_nonfinite_variable.startswith("sequential/dense")
    assert not np.isfinite(e.loss)
    for fact in ("epoch 0", "batch 1", "step 2", "loss_scale=512", "skipped_steps=1",
                 "Likely cause", "Fix"):
        assert fact in str(err.value)


def test_skip_policy_continues_and_patience_counts_consecutive():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _poisoned()
    model = make_model()
    compile_fp16(model)
    skip = NanMonitor("skip")
    hist = model.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False, callbacks=[skip])
    assert hist.epoch == [0, 1, 2] and len(skip.events) == 3
    patient = NanMonitor("stop", patience=2)  # one bad batch per epoch is never 2 in a row
    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False, callbacks=[patient])
    assert hist.epoch == [0, 1] and patient.stopped_event is None


def test_scale_pinned_at_minimum_stops():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(128)
    model = make_model(spikes=set(range(2, 100)))
    compile_fp16(model, initial_scale=4.0, min_scale=1.0)
    nan = NanMonitor("stop", patience=3)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[nan])
    event = nan.stopped_event
    assert event.trigger == "scale_at_minimum" and event.loss_scale == 1.0
    # The injected gradient is inf in float32 too (the float32 replay keeps the layer's call
    # counter): not blamed on float16; tests/callbacks/test_events.py has one that only
    # float16 overflows.
    assert event.kind == "divergence" and "gradients non-finite in float32 too" in event.cause
    # spikes from call 2: scale 4 -> 2 -> 1 (calls 2, 3), then pinned at calls 4, 5, 6
    assert event.step == 7 and nan.overflow_steps == 5


def test_backup_and_restore_resume_after_stop(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    clean = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    bad_x = x.copy()
    bad_x[:, 0] = np.nan
    poisoned = tf.data.Dataset.from_tensor_slices((bad_x, y)).batch(16)
    backup_dir = str(tmp_path / "backup")

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.at = getattr(self, "at", {})
            self.at[epoch] = ([w.copy() for w in self.model.get_weights()],
                              self.model.optimizer.loss_scale)

    model = make_model(spikes={1})
    compile_fp16(model)
    backup = keras.callbacks.BackupAndRestore(backup_dir)
    nan, snap = NanMonitor("stop", protect=[backup]), Snapshot()
    # Epochs 0-1 clean, epoch 2 poisoned: stops in epoch 2.
    data = clean.repeat(2).concatenate(poisoned).concatenate(clean.repeat())
    hist = model.fit(data, epochs=5, steps_per_epoch=4, verbose=0, callbacks=[nan, backup, snap])
    assert hist.epoch == [0, 1, 2] and nan.stopped_event.epoch == 2
    assert os.path.isdir(backup_dir)  # not wiped by on_train_end

    resumed = make_model()
    compile_fp16(resumed)
    backup2, snap2 = keras.callbacks.BackupAndRestore(backup_dir), Snapshot()
    hist2 = resumed.fit(clean.repeat(), epochs=4, steps_per_epoch=4, verbose=0,
                        callbacks=[NanMonitor("stop"), backup2, snap2])
    assert hist2.epoch == [2, 3]  # resumed after the last completed epoch
    weights, scale = snap.at[2]
    weights2, scale2 = snap2.at[2]
    assert scale2 == scale == 512.0  # loss scale restored (one overflow in epoch 0)
    for a, b in zip(weights, weights2):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(backup_dir)  # a clean finish deletes it as usual


class _Interrupt(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if self.model._tfmp_epoch == 1 and batch == 1:
            raise RuntimeError("interrupted")

    def on_epoch_begin(self, epoch, logs=None):
        self.model._tfmp_epoch = epoch


@pytest.mark.parametrize("monitors_first", [True, False], ids=["monitors_first", "backup_first"])
def test_resume_reads_the_restored_state_in_any_callback_order(tmp_path, monitors_first):
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, y = make_data(64)
    clean = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    bad_y = y.copy()
    bad_y[:16] = np.nan
    # Epoch 0: a NaN batch (a NaN loss, skipped) and an overflow; epoch 1: interrupted.
    epoch0 = tf.data.Dataset.from_tensor_slices((x, bad_y)).batch(16)
    backup_dir = str(tmp_path / "backup")

    def run(data, epochs, extra=(), spikes=()):
        model = make_model(spikes=spikes)
        model.compile(tfmp.wrap_optimizer(keras.optimizers.Adam(1e-2), guard=True), "mse")
        monitors = [LossScaleMonitor(), NanMonitor("skip")]
        backup = keras.callbacks.BackupAndRestore(backup_dir)
        rec = Recorder()
        order = monitors + [backup] if monitors_first else [backup] + monitors
        model.fit(data, epochs=epochs, steps_per_epoch=4, verbose=0,
                  callbacks=[*order, rec, *extra])
        return model, monitors, rec

    with pytest.raises(RuntimeError, match="interrupted"):
        run(epoch0.concatenate(clean.repeat()), 3, [_Interrupt()], spikes={2})
    model, (scale_monitor, nan_monitor), rec = run(clean.repeat(), 3)
    assert not nan_monitor.events  # no phantom NaN loss at the first batch
    s = scale_monitor.summary
    assert s["start_step"] == 4 and s["steps"] == 8  # epochs 1 and 2 after the restore
    assert s["nan_losses"] == 0 and s["overflow_steps_skipped"] == 0
    assert rec.batches[0]["skipped_steps"] == 2 and rec.batches[0]["nan_losses"] == 1


def test_counters_print_as_whole_numbers(capsys):
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, y = make_data(32)
    model = make_model()
    model.compile(tfmp.wrap_optimizer(keras.optimizers.Adam(1e-2), guard=True), "mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=2,
              callbacks=[LossScaleMonitor(), NanMonitor()])
    out = capsys.readouterr().out
    assert "loss_scale: 1 - nan_losses: 0 - skipped_steps: 0" in out
    assert "e+00" not in out


def _fit_with_monitors(model, x, y):
    rec, nan = Recorder(), NanMonitor("stop")
    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False,
                     callbacks=[LossScaleMonitor(warn_below=0.0), nan, rec])
    return hist, rec, nan


def test_mirrored_strategy():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(128)
    with mirrored().scope():
        model = make_model(spikes={3})
        compile_fp16(model)
    hist, rec, nan = _fit_with_monitors(model, x, y)
    assert [b["skipped_steps"] for b in rec.batches[:5]] == [0, 0, 0, 1, 1]
    assert hist.history["skipped_steps"] == [1, 1] and nan.overflow_steps == 1
    assert hist.history["loss_scale"] == [512.0, 512.0]


def test_steps_per_execution():
    # (Keras 3.15 cannot combine steps_per_execution > 1 with MirroredStrategy on
    # CPU, even in float32 with plain Adam, so this runs on one device.)
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(128)
    model = make_model(spikes={3})
    opt = tfmp.wrap_optimizer(keras.optimizers.Adam(1e-2), initial_scale=1024.0)
    model.compile(opt, "mse", steps_per_execution=2)
    hist, rec, nan = _fit_with_monitors(model, x, y)
    assert len(rec.batches) == 8  # one call per execution of 2 steps
    assert [b["skipped_steps"] for b in rec.batches[:3]] == [0, 1, 1]
    assert hist.history["skipped_steps"] == [1, 1] and nan.overflow_steps == 1
    assert hist.history["loss_scale"] == [512.0, 512.0]


def test_any_optimizer():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, y = _poisoned()
    for guard, skipped in ((False, 0), (True, 4)):
        model = make_model()
        model.compile(tfmp.wrap_optimizer(keras.optimizers.SGD(1e-3), guard=guard), "mse")
        hist = model.fit(x, y, epochs=4, batch_size=16, verbose=0, shuffle=False,
                         callbacks=[LossScaleMonitor(), NanMonitor("skip")])
        assert hist.history["loss_scale"] == [1.0] * 4
        assert hist.history["skipped_steps"][-1] == skipped


@pytest.mark.parametrize("make, fragment", [
    (lambda: NanMonitor("ignore"), "on_nan='ignore'"),
    (lambda: NanMonitor(patience=0), "patience=0"),
    (lambda: LossScaleMonitor(log_every=0), "log_every=0"),
    (lambda: LossScaleMonitor(warn_below=float("nan")), "warn_below=nan"),
    (lambda: LossScaleMonitor(warn_below="100"), "warn_below='100'"),
])
def test_bad_arguments(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()
