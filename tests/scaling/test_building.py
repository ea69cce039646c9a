"""The optimizer is built before the first step, so that Keras traces the step once."""

import keras
import numpy as np
import tensorflow as tf

import tfmp
from helpers import CountCalls, Subclassed, make_data, mirrored
from tfmp.callbacks import NanMonitor
from tfmp.scaling import build_optimizer


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), CountCalls(name="count"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(1)])


def _fit(model, **kwargs):
    x, y = make_data(64)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, **kwargs)
    return model.get_layer("count").training_calls


def test_keras_alone_traces_the_first_step_twice_and_tfmp_once():
    stock = _model()
    stock.compile(keras.optimizers.Adam(), "mse")
    # Keras 3 builds the optimizer inside the first trace (no strategy set), and
    # TensorFlow traces again a function that created variables: what tfmp saves.
    assert _fit(stock) == 2, f"Keras {keras.__version__} no longer traces the first step twice"
    # tfmp's optimizer built by Keras in the step creates its variables out of the trace
    in_step = _model()
    in_step.compile(tfmp.wrap_optimizer(keras.optimizers.Adam(), "float32", guard=True), "mse")
    assert _fit(in_step) == 1
    monitored = _model()
    monitored.compile(tfmp.wrap_optimizer(keras.optimizers.Adam(), "float32", guard=True), "mse")
    assert _fit(monitored, callbacks=[NanMonitor()]) == 1  # built at the start of fit
    prepared, opt = tfmp.prepare(_model(), keras.optimizers.Adam(), "float32", guard=True)
    assert opt.built  # by prepare
    prepared.compile(opt, "mse")
    prepared.get_layer("count").training_calls = 0  # prepare's audit ran the model
    assert _fit(prepared) == 1
    # The same variables, the same steps: bit-identical however it was built, and the
    # weights those of Keras' own Adam (no step skipped, a scale of 1).
    for a, b, c in zip(stock.get_weights(), in_step.get_weights(), monitored.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)
    assert [v.shape for v in in_step.optimizer.variables] == [
        v.shape for v in monitored.optimizer.variables]
    for a, b in zip(in_step.optimizer.variables, monitored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_guarded_step_traced_before_the_optimizer_is_built_is_guarded():
    # No callback and no prepare: Keras builds the optimizer in the first (only) traced
    # step, and the guard has it built before it looks. A NaN in the first batch then
    # leaves BatchNorm's statistics as they were: the model ends as if it had seen only
    # the clean second batch (whose step moved them).
    x, y = make_data(32)
    x[3, 0] = np.nan
    models = []
    for first in (0, 16):
        model = tfmp.guard_model_state(_model())
        model.compile(tfmp.wrap_optimizer(keras.optimizers.SGD(0.1), "float32", guard=True),
                      "mse")
        model.fit(x[first:], y[first:], batch_size=16, epochs=1, verbose=0, shuffle=False)
        assert model.get_layer("count").training_calls == 1
        models.append(model)
    guarded, clean = models
    assert int(guarded.optimizer.skipped_steps.numpy()) == 1
    assert int(guarded.optimizer.iterations.numpy()) == int(clean.optimizer.iterations.numpy()) == 1
    bn = guarded.layers[-2]
    assert not np.array_equal(bn.moving_mean.numpy(), np.zeros(16))  # the clean step moved it
    for a, b in zip(guarded.get_weights(), clean.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_guarded_step_skipped_on_the_first_trace_leaves_the_statistics():
    # The state guard needs a built optimizer when the step is traced: built early, the
    # first (only) trace is guarded. A NaN in the first batch then leaves BatchNorm's
    # statistics as they were.
    model = _model()
    model.compile(tfmp.wrap_optimizer(keras.optimizers.SGD(1e-3), "float32", guard=True), "mse")
    tfmp.guard_model_state(model)
    bn = model.layers[-2]
    before = [v.numpy() for v in bn.non_trainable_weights]
    x, y = make_data(16)
    x[3, 0] = np.nan
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[NanMonitor("skip")])
    assert int(model.optimizer.skipped_steps.numpy()) == 1
    for a, b in zip(before, bn.non_trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_nothing_is_built_for_a_model_without_variables_yet_or_an_optimizer_built_before():
    model = Subclassed()  # never called: no variables yet
    model.compile(keras.optimizers.Adam(), "mse")
    assert not build_optimizer(model) and not model.optimizer.built
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0,
              callbacks=[NanMonitor()])  # Keras builds it in the step, as before
    assert model.optimizer.built
    assert not build_optimizer(model)  # once
    assert not build_optimizer(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))


def test_built_under_the_strategy_the_model_was_made_under():
    with mirrored().scope():
        model = _model()
        model.compile(tfmp.wrap_optimizer(keras.optimizers.Adam(), "float32", guard=True), "mse")
    assert build_optimizer(model)  # called outside the scope: the model's strategy is used
    assert isinstance(model.optimizer.iterations.value, tf.distribute.DistributedValues)
    x, y = make_data(64)
    hist = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[NanMonitor()])
    assert np.isfinite(hist.history["loss"][-1]) and int(model.optimizer.iterations.numpy()) == 4
