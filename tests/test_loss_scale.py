"""DynamicLossScaleOptimizer: scale rules, counters, fit, custom loops, XLA,
MirroredStrategy, gradient accumulation, EMA / weight decay and resume."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from tfmp import DynamicLossScaleOptimizer as DLSO

INF = float("inf")


def _vars():
    return [keras.Variable(np.ones((2,), "float32"), name="a"),
            keras.Variable(np.ones((3,), "float32"), name="b")]


def _step(opt, variables, bad=None):
    """One apply; `bad` is the index of the variable whose gradient is inf."""
    grads = [tf.ones(v.shape) for v in variables]
    if bad is not None:
        grads[bad] = tf.constant([1.0] + [INF] * (variables[bad].shape[0] - 1))
    opt.apply(grads, variables)


def _state(opt):
    return (opt.loss_scale, int(opt.skipped_steps.numpy()), int(opt.step_counter.numpy()))


def make_model(seed=1, out_dtype="float32"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1, dtype=out_dtype),
    ])


def make_data(n=256, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 8).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------- arguments

@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"initial_scale": 0.0}, "initial_scale=0.0"),
        ({"initial_scale": -2.0}, "initial_scale=-2.0"),
        ({"initial_scale": math.inf}, "initial_scale=inf"),
        ({"initial_scale": math.nan}, "initial_scale=nan"),
        ({"initial_scale": "big"}, "initial_scale='big'"),
        ({"growth_factor": 1.0}, "growth_factor=1.0"),
        ({"backoff_factor": 1.0}, "backoff_factor=1.0"),
        ({"backoff_factor": 0.0}, "backoff_factor=0.0"),
        ({"growth_interval": 0}, "growth_interval=0"),
        ({"growth_interval": 2.5}, "growth_interval=2.5"),
        ({"hysteresis": 0}, "hysteresis=0"),
        ({"hysteresis": True}, "hysteresis=True"),
        ({"min_scale": 0.0}, "min_scale=0.0"),
        ({"min_scale": 2.0**16}, "min_scale=65536.0"),
        ({"max_scale": 2.0**10}, "max_scale=1024.0"),
        ({"dynamic": "yes"}, "dynamic='yes'"),
    ],
)
def test_bad_arguments_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        DLSO(keras.optimizers.SGD(), **kwargs)


def test_rejects_double_wrapping_and_non_optimizers():
    with pytest.raises(ValueError, match="already a LossScaleOptimizer"):
        DLSO(DLSO(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="keras.optimizers.Optimizer"):
        DLSO("adam")


# ------------------------------------------------------------ scale rules

def test_backoff_floor_and_counters():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=16.0, min_scale=4.0)
    before = [w.numpy().copy() for w in v]
    for expected in (8.0, 4.0, 4.0, 4.0):
        _step(opt, v, bad=1)
        assert opt.loss_scale == expected
    assert int(opt.skipped_steps.numpy()) == 4
    assert int(opt.last_skipped_step.numpy()) == 4
    assert opt.first_nonfinite_variable == v[1].path
    for w, b in zip(v, before):
        np.testing.assert_array_equal(w.numpy(), b)  # nothing applied
    _step(opt, v)
    assert int(opt.iterations.numpy()) == 1
    assert int(opt.last_skipped_step.numpy()) == 4
    _step(opt, v, bad=0)
    assert opt.first_nonfinite_variable == v[0].path
    assert int(opt.last_skipped_step.numpy()) == 6  # 1 applied + 5 skipped


def test_growth_and_cap():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=2.0**20, growth_interval=3,
               max_scale=2.0**22)
    scales = []
    for _ in range(12):
        _step(opt, v)
        scales.append(opt.loss_scale)
    assert scales == [2.0**20] * 2 + [2.0**21] * 3 + [2.0**22] * 7
    assert int(opt.skipped_steps.numpy()) == 0


def test_overflow_resets_growth_counter():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=64.0, growth_interval=3)
    _step(opt, v), _step(opt, v), _step(opt, v, bad=0)
    assert _state(opt) == (32.0, 1, 0)
    _step(opt, v), _step(opt, v)
    assert opt.loss_scale == 32.0
    _step(opt, v)
    assert opt.loss_scale == 64.0


def test_hysteresis():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=64.0, hysteresis=3, growth_interval=2)
    _step(opt, v, bad=0)
    _step(opt, v, bad=0)
    assert _state(opt) == (64.0, 2, 0)  # two overflows tolerated
    _step(opt, v, bad=0)
    assert opt.loss_scale == 32.0  # third backs off
    _step(opt, v, bad=0)
    assert opt.loss_scale == 16.0  # budget used up until the scale grows again
    _step(opt, v), _step(opt, v)
    assert opt.loss_scale == 32.0  # grew: budget refilled
    _step(opt, v, bad=0), _step(opt, v, bad=0)
    assert _state(opt) == (32.0, 6, 0)


def test_fixed_scale_is_a_nan_guard():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.5), initial_scale=1.0, dynamic=False, growth_interval=1)
    _step(opt, v, bad=1)
    _step(opt, v)
    _step(opt, v)
    assert _state(opt)[:2] == (1.0, 1)
    np.testing.assert_allclose(v[0].numpy(), [0.0, 0.0])  # two SGD steps of 0.5


# ------------------------------------------------------------- model.fit

def test_defaults_match_stock_keras_exactly():
    x, y = make_data()
    results = []
    for make_opt in (lambda o: DLSO(o), lambda o: keras.optimizers.LossScaleOptimizer(o)):
        with tfmp.policy_scope("fp16", hardware=tfmp.HardwareInfo("gpu", ("g",), ((7, 0),))):
            model = make_model()
            opt = make_opt(keras.optimizers.Adam(1e-2))
            model.compile(opt, "mse")
            model.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False)
        results.append((model.get_weights(), float(opt.dynamic_scale.numpy())))
    (w1, s1), (w2, s2) = results
    assert s1 == s2
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_compile_does_not_wrap_twice_and_nan_sample_stops_at_min_scale():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data()
    x[37, 3] = np.nan  # one poisoned sample: batch 2 of every epoch
    model = make_model()
    opt = DLSO(keras.optimizers.SGD(1e-3), initial_scale=8.0, min_scale=1.0)
    model.compile(opt, "mse")
    assert model.optimizer is opt
    model.fit(x, y, epochs=6, batch_size=16, verbose=0, shuffle=False)
    assert opt.loss_scale == 1.0  # 8 -> 4 -> 2 -> 1 -> 1 ...
    assert int(opt.skipped_steps.numpy()) == 6
    assert int(opt.iterations.numpy()) == 6 * 16 - 6
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.parametrize("jit", [False, True])
def test_fit_trains_under_fp16(jit):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data()
    model = make_model()
    opt = DLSO(keras.optimizers.Adam(1e-2), initial_scale=2.0**15)
    model.compile(opt, "mse", jit_compile=jit)
    hist = model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0] * 0.5
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_keras_saving_round_trips_config_and_state(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data()
    x[5, 0] = np.inf
    model = make_model()
    opt = DLSO(keras.optimizers.Adam(1e-2), initial_scale=256.0, growth_interval=7,
               min_scale=2.0, max_scale=2.0**20, hysteresis=2, growth_factor=4.0,
               backoff_factor=0.25)
    model.compile(opt, "mse")
    model.fit(x, y, epochs=3, batch_size=32, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    new = loaded.optimizer
    assert type(new) is DLSO
    assert new.get_config() == opt.get_config()
    assert type(new.inner_optimizer) is keras.optimizers.Adam
    for name in ("dynamic_scale", "step_counter", "skipped_steps", "last_skipped_step",
                 "first_nonfinite_index", "hysteresis_left"):
        assert getattr(new, name).numpy() == getattr(opt, name).numpy(), name
    # Variable paths lose the model-name prefix on load; the variable is the same.
    assert opt.first_nonfinite_variable == "sequential/dense/kernel"
    assert new.first_nonfinite_variable.endswith("dense/kernel")

    # Resume: continuing the loaded model equals continuing the original.
    x[5, 0] = 0.0
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    loaded.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert _state(new) == _state(opt)


def test_tf_train_checkpoint_round_trips_state(tmp_path):
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=64.0, hysteresis=2)
    _step(opt, v, bad=1), _step(opt, v, bad=1), _step(opt, v)
    ckpt = tf.train.Checkpoint(optimizer=opt, v0=v[0].value, v1=v[1].value)
    path = ckpt.save(str(tmp_path / "ckpt"))
    saved = _state(opt), int(opt.hysteresis_left.numpy()), opt.first_nonfinite_variable

    v2 = _vars()
    opt2 = DLSO(keras.optimizers.SGD(0.1), initial_scale=64.0, hysteresis=2)
    opt2.build(v2)
    tf.train.Checkpoint(optimizer=opt2, v0=v2[0].value, v1=v2[1].value).restore(path)
    assert (_state(opt2), int(opt2.hysteresis_left.numpy()), opt2.first_nonfinite_variable) == saved


# ----------------------------------------------------- EMA, weight decay

def test_ema_and_weight_decay_match_stock():
    x, y = make_data()
    weights = []
    for wrap in (DLSO, keras.optimizers.LossScaleOptimizer):
        keras.config.set_dtype_policy("mixed_float16")
        model = make_model()
        inner = keras.optimizers.AdamW(1e-2, weight_decay=0.05, use_ema=True,
                                       ema_overwrite_frequency=5)
        model.compile(wrap(inner), "mse")
        model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------- gradient accumulation

def _fit_weights(strategy, accum, batch, epochs=2, scale_opt=True):
    x, y = make_data(128)
    with strategy.scope():
        model = make_model()
        inner = keras.optimizers.SGD(0.05, gradient_accumulation_steps=accum)
        opt = DLSO(inner, initial_scale=1024.0) if scale_opt else inner
        model.compile(opt, "mse")
    model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0, shuffle=False)
    return model, opt


def _mirrored():
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.mark.parametrize("strategy_fn", [tf.distribute.get_strategy, _mirrored],
                         ids=["one_device", "mirrored"])
def test_accumulation_matches_one_large_batch(strategy_fn):
    big, _ = _fit_weights(tf.distribute.get_strategy(), None, 32)
    acc, opt = _fit_weights(strategy_fn(), 4, 8)
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


def test_mirrored_first_nonfinite_variable_from_any_replica():
    strategy = _mirrored()
    with strategy.scope():
        v = _vars()
        opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=8.0)
        opt.build(v)

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


# ----------------------------------------------------------- custom loops

def test_custom_loop_keras3_way_and_unscaled_clipping():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = make_data(64)
    model = make_model()
    ref = make_model()  # same init, float16 compute, no scaling, clipped true grads
    opt = DLSO(keras.optimizers.SGD(0.05), initial_scale=2.0**12)
    ref_opt = keras.optimizers.SGD(0.05)
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
            scaled = opt.scale_loss(loss)
        grads = tfmp.get_unscaled_gradients(opt, tape.gradient(scaled, model.trainable_variables))
        grads, _ = tf.clip_by_global_norm(grads, 0.5)
        opt.apply_unscaled(grads, model.trainable_variables)
        return loss

    @tf.function
    def ref_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, ref(xb, training=True))
        grads = tape.gradient(loss, ref.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 0.5)
        ref_opt.apply(grads, ref.trainable_variables)

    losses = []
    for i in range(0, 64, 16):
        losses.append(float(step(x[i:i + 16], y[i:i + 16])))
        ref_step(x[i:i + 16], y[i:i + 16])
    assert losses[-1] < losses[0]
    for a, b in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_custom_loop_apply_skips_overflow():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=2.0**15)

    @tf.function
    def step(big):
        with tf.GradientTape() as tape:
            loss = tf.cast(tf.reduce_sum(tf.cast(v[0], "float16") * tf.cast(big, "float16")),
                           "float32")
            scaled = opt.scale_loss(loss)
        opt.apply(tape.gradient(scaled, [v[0]]), [v[0]])

    opt.build([v[0]])
    step(tf.constant(4.0))  # 4 * 32768 overflows float16 in the backward pass
    assert _state(opt) == (2.0**14, 1, 0)
    step(tf.constant(1.0))
    np.testing.assert_allclose(v[0].numpy(), [0.9, 0.9])
