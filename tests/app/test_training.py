"""tfmp.app.training in-process: the tfds path through mock data, outputs, remat, summaries."""

import functools
import glob
import json
import warnings

import keras
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import models
import tfmp
from tfmp.app import data, training
from tfmp.app.config import TrainConfig


def test_tfds_mock_data_end_to_end(tmp_path):
    config = TrainConfig(model="cnn", dataset="mnist", precision="bf16", epochs=2,
                         steps_per_epoch=3, batch_size=16, model_dir=str(tmp_path))
    build = functools.partial(models.get("cnn")[0], width=8)
    with tfds.testing.mock_data(num_examples=128):
        d = data.load("mnist", "image", 16)
        summary = training.train(config, build, d, tf.distribute.get_strategy())
    assert summary["dataset"] == "mnist" and summary["policy"] == "mixed_bfloat16"
    assert summary["epochs_completed"] == [0, 1] and summary["stopped_by_nan"] is False
    assert set(summary["eval_metrics"]) == {"accuracy", "loss"}
    on_disk = json.loads((tmp_path / training.SUMMARY).read_text())
    assert on_disk["flags"]["dataset"] == "mnist" and on_disk["samples_per_sec"] > 0
    # bfloat16: the optimizer is the NaN guard (a fixed scale of 1); no scale flag applies.
    assert on_disk["loss_scale"] == {"mode": "guard", "loss_scale_start": 1.0,
                                     "loss_scale_end": 1.0, "loss_scale_min": 1.0}
    assert [on_disk["flags"][k] for k in training.SCALE_FLAGS] == [None, None, None]
    loaded = keras.models.load_model(tmp_path / training.FINAL_MODEL)
    assert loaded.outputs[0].dtype == "float32"
    tags = set()
    for path in glob.glob(str(tmp_path / training.TENSORBOARD / "train" / "events.out.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert {"epoch_loss", "epoch_accuracy", "epoch_loss_scale", "epoch_skipped_steps"} <= tags
    assert not (tmp_path / training.BACKUP).exists()  # finished: the backup is gone
    text = training.human_summary(summary)
    assert "mixed_bfloat16" in text and "samples/s" in text and "eval_accuracy" in text
    assert "(epochs after the first)" in text  # the second epoch alone, without tracing
    one = training.human_summary({**summary, "epochs_completed": [0]})
    assert "(one epoch, tracing included)" in one


def test_remat_recomputes_the_layers_calls(monkeypatch):
    calls = []
    original = keras.layers.Layer.rematerialized_call

    def counting(self, layer_call, *args, **kwargs):
        calls.append(self.name)
        return original(self, layer_call, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "rematerialized_call", counting)
    d = data.synthetic("vector", 32, train_examples=64, eval_examples=32)
    for remat in (True, False):
        calls.clear()
        config = TrainConfig(model="mlp", remat=remat, precision="fp32")
        model, _ = training._build_compiled(config, models.get("mlp")[0], d, "float32")
        model.fit(d.train, epochs=1, steps_per_epoch=1, verbose=0)
        dense = {l.name for l in model.layers if isinstance(l, keras.layers.Dense)}
        if remat:  # every Dense layer's call went through the rematerialized path
            assert dense <= set(calls)
        else:
            assert not calls


def test_nan_stop_keeps_backup_and_writes_summary(tmp_path):
    config = TrainConfig(model="mlp", precision="fp16", epochs=3, steps_per_epoch=4,
                         batch_size=16, model_dir=str(tmp_path))
    d = data.synthetic("vector", 16, train_examples=64, eval_examples=16)
    bad = d.train.map(lambda x, y: (x * float("nan"), y))
    clean_then_bad = d.train.take(4).concatenate(bad)
    d = data.Data(clean_then_bad, d.eval, d.input_shape, d.num_classes, None, 64, "poisoned")
    with warnings.catch_warnings():  # fp16 on a CPU: the trap warning
        warnings.simplefilter("ignore")
        with pytest.raises(training.TrainingStopped, match="nonfinite loss at epoch 1"):
            training.train(config, models.get("mlp")[0], d, tf.distribute.get_strategy())
    summary = json.loads((tmp_path / training.SUMMARY).read_text())
    # No scale flag given: the optimizer's defaults, as it used them.
    assert summary["loss_scale"]["mode"] == "dynamic"
    assert {k: summary["flags"][k] for k in training.SCALE_FLAGS} == {
        "initial_scale": 32768.0, "growth_interval": 2000, "min_scale": 1.0}
    event = summary["nan_events"][0]
    assert summary["stopped_by_nan"] and (event["kind"], event["trigger"]) == ("data", "nonfinite_loss")
    assert (tmp_path / training.BACKUP / "latest.weights.h5").exists()
    assert not (tmp_path / training.FINAL_MODEL).exists()


def test_the_scale_flags_recorded_are_the_optimizers_own():
    fixed = tfmp.wrap_optimizer("adam", "mixed_float16", loss_scale=512)
    assert training.used_scale_flags(fixed, "mixed_float16") == (
        "fixed", {"initial_scale": 512.0, "growth_interval": None, "min_scale": 512.0})
    dynamic = tfmp.wrap_optimizer("adam", "mixed_float16", initial_scale=64, min_scale=2)
    assert training.used_scale_flags(dynamic, "mixed_float16") == (
        "dynamic", {"initial_scale": 64.0, "growth_interval": 2000, "min_scale": 2.0})
    guard = tfmp.wrap_optimizer("adam", "mixed_bfloat16", guard=True)
    assert training.used_scale_flags(guard, "mixed_bfloat16") == (
        "guard", dict.fromkeys(training.SCALE_FLAGS))
