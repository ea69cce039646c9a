"""A skipped step changes no model state: BatchNormalization's statistics included."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import tfmp
from helpers import mirrored

BAD_BATCH = 3


def _cnn():
    keras.utils.set_random_seed(0)
    return models.get("cnn")[0](input_shape=(8, 8, 3), num_classes=4, width=8, stages=1)


def _data(batches=6, batch=16):
    rng = np.random.RandomState(0)
    x = rng.rand(batches * batch, 8, 8, 3).astype("float32")
    y = rng.randint(0, 4, batches * batch)
    # One poisoned sample in batch 3, in the second half (replica 1 under MirroredStrategy).
    x[BAD_BATCH * batch + 13, 2, 2, 1] = np.nan
    return x, y


class _Snapshots(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.first = self.model.get_weights()

    def on_train_batch_begin(self, batch, logs=None):
        self.before = self.model.get_weights() if batch == BAD_BATCH else getattr(self, "before", None)

    def on_train_batch_end(self, batch, logs=None):
        if batch == BAD_BATCH:
            self.after = self.model.get_weights()
        self.last = self.model.get_weights()


def _fit(precision, guard=True, strategy=None):
    strategy = strategy or tf.distribute.get_strategy()
    x, y = _data()
    with strategy.scope():
        model, opt = tfmp.prepare(_cnn(), keras.optimizers.Adam(1e-2), precision,
                                  guard=True, initial_scale=2.0**10)
        if not guard:  # the same model and optimizer without the train-step guard
            model = keras.Model(model.inputs, model.outputs)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    snaps = _Snapshots()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snaps])
    return model, opt, snaps


def _bn_stats(model):
    return [v for v in model.non_trainable_weights if "moving" in v.path]


@pytest.mark.parametrize("precision", ["float32", "bf16", "fp16"])
def test_nan_batch_leaves_every_weight_unchanged(precision):
    model, opt, snaps = _fit(precision)
    assert int(opt.skipped_steps.numpy()) == 1
    assert len(_bn_stats(model)) == 6  # three BatchNormalization layers
    for before, after in zip(snaps.before, snaps.after):
        np.testing.assert_array_equal(before, after)  # moving statistics included
    assert all(np.isfinite(w).all() for w in snaps.last)
    # The run went on: the later batches changed the weights again, the moving
    # statistics included (a guard restoring them on every step would freeze them).
    stats = [i for i, w in enumerate(model.weights) if "moving" in w.path]
    assert all(not np.array_equal(snaps.after[i], snaps.last[i]) for i in stats)
    assert all(not np.array_equal(snaps.first[i], snaps.before[i]) for i in stats)


def test_without_the_guard_batchnorm_takes_the_nan():
    model, opt, snaps = _fit("bf16", guard=False)
    assert int(opt.skipped_steps.numpy()) == 1
    stats = [v.numpy() for v in _bn_stats(model)]
    assert any(not np.isfinite(s).all() for s in stats)  # what the guard prevents


def test_mirrored_nan_on_one_replica_leaves_state_unchanged():
    strategy = mirrored()
    model, opt, snaps = _fit("bf16", strategy=strategy)
    assert int(opt.skipped_steps.numpy()) == 1
    for before, after in zip(snaps.before, snaps.after):
        np.testing.assert_array_equal(before, after)
    for variable in _bn_stats(model):
        # Keras keeps one copy of the statistics per replica (not synced): each is finite.
        assert all(np.isfinite(c.numpy()).all() for c in variable.value.values)


def test_frozen_layers_are_not_copied():
    model = _cnn()
    model.get_layer("stem_bn").trainable = False
    guarded = {v.path for v in tfmp.scaling.state_guard.forward_state(model)}
    assert guarded and not any(p.startswith("cnn/stem_bn") or "stem_bn" in p for p in guarded)
