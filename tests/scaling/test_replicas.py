"""One decision for every replica (tfmp.scaling.replicas): MirroredStrategy with and
without merge_call, gradient accumulation, counters in steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmp import DynamicLossScaleOptimizer as DLSO
from helpers import _vars, make_data, make_model, mirrored


# -------------------------------------------------- gradient accumulation

def _fit_weights(strategy, accum, batch, passes=2, scale_opt=True, adam=False):
    x, y = make_data(128)
    # `passes` over the data in one epoch (the batches of `epochs=passes`, unshuffled): under
    # MirroredStrategy each epoch builds its per-replica iterators again.
    x, y = np.tile(x, (passes, 1)), np.tile(y, (passes, 1))
    with strategy.scope():
        model = make_model()
        inner = (keras.optimizers.Adam(1e-2, gradient_accumulation_steps=accum) if adam else
                 keras.optimizers.SGD(0.05, gradient_accumulation_steps=accum))
        opt = DLSO(inner, initial_scale=1024.0) if scale_opt else inner
        model.compile(opt, "mse")
    model.fit(x, y, epochs=1, batch_size=batch, verbose=0, shuffle=False)
    return model, opt


def _mirrored():
    return mirrored()


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
@pytest.mark.parametrize("strategy_fn", [tf.distribute.get_strategy, _mirrored],
                         ids=["one_device", "mirrored"])
def test_accumulation_matches_one_large_batch(strategy_fn, adam):
    # Adam: its bias correction reads `iterations`, which must count updates (it
    # counted micro-batches on tfmp's MirroredStrategy path before: 0.014 off).
    big, _ = _fit_weights(tf.distribute.get_strategy(), None, 32, adam=adam)
    acc, opt = _fit_weights(strategy_fn(), 4, 8, adam=adam)
    assert int(opt.inner_optimizer.iterations.numpy()) == 2 * 128 // 32
    for a, b in zip(big.get_weights(), acc.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_mirrored_fp16_with_accumulation_trains():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data()
    with _mirrored().scope():
        model = make_model()
        opt = DLSO(keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2))
        model.compile(opt, "mse")
    hist = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0] * 0.5
    assert all(np.isfinite(w).all() for w in model.get_weights())


# -------------------------------------------------------- MirroredStrategy

def test_mirrored_one_scale_and_every_replica_skips():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    # Global batch 16 -> 8 per replica: sample 13 lands on the second replica only
    # (stock Keras reads the first replica's finite flag and would apply NaN).
    x[13, 0] = np.nan
    with _mirrored().scope():
        model = make_model()
        opt = DLSO(keras.optimizers.SGD(0.01), initial_scale=64.0, growth_interval=2)
        model.compile(opt, "mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    assert int(opt.skipped_steps.numpy()) == 2
    assert opt.first_nonfinite_variable == model.weights[0].path
    for var in model.weights + opt.variables:
        copies = [c.numpy() for c in var.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=var.path)
        assert np.isfinite(copies[0]).all(), var.path
    # 8 steps, skips at steps 1 and 5 (-> 32), regrowth after 2 clean steps (-> 64).
    assert opt.loss_scale == 64.0


def _built(strategy, accumulation=None):
    """Two variables and a built optimizer (SGD, initial scale 8) under `strategy`."""
    with strategy.scope():
        v = _vars()
        inner = keras.optimizers.SGD(0.1, gradient_accumulation_steps=accumulation)
        opt = DLSO(inner, initial_scale=8.0)
        opt.build(v)
    return v, opt


def test_mirrored_first_nonfinite_variable_from_any_replica():
    strategy = _mirrored()
    v, opt = _built(strategy)

    @tf.function
    def step():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            g_b = tf.ones((3,)) / (1.0 - tf.cast(replica, tf.float32))  # inf on replica 1
            opt.apply([tf.ones((2,)), g_b], v)

        strategy.run(replica_fn)

    step()
    assert int(opt.skipped_steps.numpy()) == 1
    assert opt.first_nonfinite_variable == v[1].path
    assert opt.loss_scale == 4.0
    np.testing.assert_array_equal(v[0].numpy(), [1.0, 1.0])


def _no_merge_call_mirrored():
    # What TensorFlow itself does in its strategy tests (strategy_combinations.py) to get
    # the merge_call-free path that an all-GPU MirroredStrategy takes under XLA.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    strategy.extended._use_merge_call = lambda: False
    return strategy


def test_without_merge_call_several_replicas_are_refused_in_one_line():
    strategy = _no_merge_call_mirrored()
    v, opt = _built(strategy)

    @tf.function
    def step():
        strategy.run(opt.apply, args=([tf.ones((2,)), tf.ones((3,))], v))

    with pytest.raises(ValueError, match="cannot run on MirroredStrategy over 2 replicas with "
                                         "merge_call turned off"):
        step()
    for var in v:
        np.testing.assert_array_equal(var.numpy(), np.ones(var.shape))


@pytest.mark.parametrize("rows", [(3, 13), (13,), (3,)], ids=["both", "second", "first"])
def test_nan_losses_and_skipped_steps_count_steps_not_replicas(rows):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    x[list(rows), 0] = np.nan  # step 0: a NaN sample on replica 0 (row 3), replica 1 (row 13)
    with _mirrored().scope():
        model = make_model()
        opt = DLSO(keras.optimizers.SGD(0.01), initial_scale=64.0)
        model.compile(opt, "mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    assert int(opt.skipped_steps.numpy()) == 1
    assert float(opt.nonfinite_losses.numpy()) == 1.0  # one step, not two replica-steps


def test_growth_interval_counts_optimizer_updates_under_accumulation():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), initial_scale=8.0,
               growth_interval=2)
    scales = []
    for _ in range(8):  # 8 micro-batches = 4 updates: grows after updates 2 and 4
        opt.apply([tf.ones((2,)), tf.ones((3,))], v)
        scales.append(opt.loss_scale)
    assert scales == [8.0, 8.0, 8.0, 16.0, 16.0, 16.0, 16.0, 32.0]
    assert int(opt.step_counter.numpy()) == 0


def test_growth_counts_updates_under_mirrored_accumulation():
    strategy = _mirrored()
    v, opt = _built(strategy, accumulation=2)
    opt.growth_interval = 2

    @tf.function
    def step():
        strategy.run(opt.apply, args=([tf.ones((2,)), tf.ones((3,))], v))

    scales = []
    for _ in range(4):  # 4 micro-batches = 2 updates: grows after the second
        step()
        scales.append(opt.loss_scale)
    assert scales == [8.0, 8.0, 8.0, 16.0]
