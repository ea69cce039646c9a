"""Under MirroredStrategy the loss-scale optimizer does all Keras' single-device `apply()` does.

Each feature of `BaseOptimizer.apply()` on its own, with and without gradient
accumulation: two replicas against one device, on the same global batches, through
`model.fit`. (Stock Keras 3.15 crashes there with accumulation, keras-team/keras#20582;
tfmp's cross-replica path once dropped constraints, weight decay's and EMA's timing,
`overwrite_with_gradient` and `loss_scale_factor`, and clipped per-replica gradients.)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tfmp
from helpers import mirrored


class Overwritten(keras.layers.Layer):
    """A Dense plus a variable assigned its gradient (`overwrite_with_gradient`), as float8
    layers' scales are: its gradient is 1e-2 x the sum of the output's gradients."""

    def build(self, input_shape):
        self.dense = keras.layers.Dense(1)
        self.dense.build(input_shape)
        self.s = self.add_weight(shape=(2,), initializer="ones", name="s",
                                 aggregation="mean")
        self.s.overwrite_with_gradient = True

    def call(self, x):
        return self.dense(x) + 1e-2 * ops.sum(self.s)


FEATURES = {
    "constraint": dict(),
    "weight_decay": dict(optimizer="adamw", weight_decay=0.3),
    "clipnorm": dict(clipnorm=0.05),
    "clipvalue": dict(clipvalue=0.01),
    "global_clipnorm": dict(global_clipnorm=0.05),
    "ema_overwrite": dict(use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2),
    # The inner optimizer's own factor: wrap_optimizer makes it the guard's fixed scale.
    "loss_scale_factor": dict(optimizer="sgd", loss_scale_factor=4.0),
    "schedule": dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.05, 3, 0.5)),
    "overwrite_with_gradient": dict(),
}


def _data():
    rng = np.random.RandomState(0)
    x = rng.randn(64, 4).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32") + 1.0)


def _fit(strategy, feature, accumulation, eager=False):
    kwargs = dict(FEATURES[feature])
    cls = {"adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}.get(
        kwargs.pop("optimizer", None), keras.optimizers.Adam)
    kwargs.setdefault("learning_rate", 0.05)
    x, y = _data()
    with strategy.scope():
        keras.utils.set_random_seed(1)
        if feature == "overwrite_with_gradient":
            layer = Overwritten()
        else:  # starts with negative weights: NonNeg has work to do
            layer = keras.layers.Dense(
                1, kernel_initializer=keras.initializers.Constant(-0.3),
                kernel_constraint=keras.constraints.NonNeg() if feature == "constraint" else None)
        model = keras.Sequential([keras.Input((4,)), layer])
        opt = tfmp.wrap_optimizer(cls(gradient_accumulation_steps=accumulation, **kwargs),
                                  "float32", guard=True)
        model.compile(opt, "mse", run_eagerly=eager)
    # Two passes over the data as one epoch (the same batches as epochs=2): under
    # MirroredStrategy every epoch builds its per-replica iterators again (~0.1 s each), and
    # an epoch of a dataset of known length builds them once more at its end, for the next.
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()  # length unknown
    model.fit(batches, epochs=1, steps_per_epoch=2 * len(x) // 16, shuffle=False, verbose=0)
    return model, opt


@pytest.mark.parametrize("accumulation", [None, 2], ids=["plain", "accumulate2"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_two_replicas_train_as_one_device(feature, accumulation):
    # One device: Keras' own apply(), eagerly (the same arithmetic, no graph to trace).
    one, one_opt = _fit(tf.distribute.get_strategy(), feature, accumulation, eager=True)
    two, two_opt = _fit(mirrored(), feature, accumulation)
    assert int(two_opt.skipped_steps.numpy()) == 0
    assert int(two_opt.inner_optimizer.iterations.numpy()) == int(
        one_opt.inner_optimizer.iterations.numpy())
    for a, b in zip(one.weights, two.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{feature}: {a.path}")
    if feature == "loss_scale_factor":
        assert (two_opt.initial_scale, two_opt.dynamic) == (4.0, False)
    if feature == "constraint":
        assert two.weights[0].numpy().min() >= 0.0  # NonNeg held on both replicas
    if feature == "overwrite_with_gradient":  # assigned its gradient, not moved by Adam
        assert np.abs(two.layers[0].s.numpy()).max() < 0.5
