"""DynamicLossScaleOptimizer: scale rules, counters, fit, custom loops, XLA, EMA /
weight decay, resume, drop-in compatibility with the stock class, float32 range.
(MirroredStrategy and gradient accumulation: test_replicas.py and test_accumulation.py.)"""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tfmp
from tfmp import DynamicLossScaleOptimizer as DLSO

from helpers import INF, _state, _step, _vars, make_data, make_model


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


@pytest.mark.parametrize("kwargs, fragment", [
    ({"initial_scale": 2.0**-130, "min_scale": 2.0**-134}, "initial_scale=7.34"),
    ({"min_scale": 2.0**-134}, "min_scale=4.59"),
    ({"initial_scale": 1e39}, "initial_scale=1e+39"),
    ({"max_scale": 1e39}, "max_scale=1e+39"),
])
def test_scales_outside_float32_normal_range_are_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=f"float32's normal range.*{re.escape(fragment)}"):
        DLSO(keras.optimizers.SGD(), **kwargs)


def test_a_scale_that_reads_zero_never_applies_a_step():
    # The scale the issue describes: flushed to 0.0 by the CPU. Scaled gradients are
    # finite zeros; the decision on the unscaled ones (0/0 = NaN) must skip.
    # (A fixed scale of 1, the guard, neither multiplies nor divides: not this case.)
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=2.0, dynamic=False)
    opt.build(v)
    opt.dynamic_scale.assign(0.0)
    opt.apply([tf.zeros((2,)), tf.zeros((3,))], v)
    assert int(opt.skipped_steps.numpy()) == 1
    assert all(np.array_equal(w.numpy(), np.ones(w.shape)) for w in v)


def test_unscaling_that_overflows_is_skipped():
    tiny = tfmp.scaling.arguments.FLOAT32_MIN_NORMAL  # accepted: the smallest normal scale
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=tiny, dynamic=False)
    assert opt.min_scale == tiny
    opt.apply([tf.fill((2,), 100.0), tf.ones((3,))], v)  # 100 / 1.2e-38 = inf
    assert int(opt.skipped_steps.numpy()) == 1
    assert opt.first_nonfinite_variable == v[0].path
    np.testing.assert_array_equal(v[0].numpy(), [1.0, 1.0])


@pytest.mark.parametrize("values, finite", [
    ([1.0, 2.0, 3.0], True),
    ([1.0, math.nan, 3.0], False),
    ([math.inf, -math.inf, 1.0], False),  # they cancel to NaN, not to a finite number
    ([-math.inf, 1.0, 1.0], False),
])
def test_fused_finiteness_check(values, finite):
    opt = DLSO(keras.optimizers.SGD())
    grads = [tf.constant(values), tf.ones((2, 2)), None]
    assert bool(opt.check_finite(grads)) is finite


def test_fused_check_sums_16_bit_gradients_in_float32():
    opt = DLSO(keras.optimizers.SGD())
    big = tf.fill((100,), tf.constant(60000.0, tf.float16))  # finite; its float16 sum is not
    assert bool(opt.check_finite([big]))
    assert not bool(opt.check_finite([tf.constant([1.0, math.inf], tf.bfloat16)]))


def test_first_nonfinite_variable_names_the_variable_passed():
    v = _vars()
    opt = DLSO(keras.optimizers.SGD(0.1), initial_scale=8.0)
    opt.build(v)
    opt.apply([tf.constant([1.0, INF, 1.0])], [v[1]])  # a custom loop applying a subset
    assert opt.first_nonfinite_variable == v[1].path


# ------------------------------------------------- drop-in for the stock class

def test_stock_positional_arguments_and_names():
    opt = DLSO(keras.optimizers.SGD(), 1024.0, 100, "lso")
    assert (opt.initial_scale, opt.growth_interval, opt.dynamic_growth_steps, opt.name) == (
        1024.0, 100, 100, "lso")
    assert DLSO(keras.optimizers.SGD(), dynamic_growth_steps=7).growth_interval == 7
    assert DLSO(keras.optimizers.SGD(), growth_interval=7, dynamic_growth_steps=7).growth_interval == 7
    with pytest.raises(ValueError, match="growth_interval=50, dynamic_growth_steps=100"):
        DLSO(keras.optimizers.SGD(), growth_interval=50, dynamic_growth_steps=100)


@pytest.mark.parametrize("kwargs", [
    {"initial_scale": 0.5}, {"initial_scale": 2.0**30}, {"dynamic_growth_steps": 1},
    {"use_ema": False, "gradient_accumulation_steps": None, "clipnorm": None},
])
def test_every_stock_config_loads_with_the_same_meaning(kwargs):
    stock = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), **kwargs)
    config = keras.optimizers.serialize(stock)["config"]
    opt = DLSO.from_config(config)
    assert (opt.initial_scale, opt.growth_interval) == (stock.initial_scale,
                                                        stock.dynamic_growth_steps)
    assert opt.min_scale <= opt.initial_scale <= opt.max_scale
    again = DLSO.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()


@pytest.mark.parametrize("kwargs", [{"use_ema": True}, {"clipnorm": 1.0}, {"bogus": 1}])
def test_stock_rejections_are_kept(kwargs):
    with pytest.raises(ValueError) as stock:
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(), **kwargs)
    with pytest.raises(ValueError) as ours:
        DLSO(keras.optimizers.SGD(), **kwargs)
    assert str(ours.value) == str(stock.value)


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
                 "first_nonfinite_index", "hysteresis_left", "nonfinite_losses"):
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


def test_a_traced_custom_loop_unscales_by_the_scale_it_scaled_with():
    # The first trace builds the optimizer (one trace): after an overflow backs the scale off,
    # the unscaled gradients are the true ones (those of the same float16 model without any
    # scaling, on the clean batches) in the eager and the traced loop alike.
    x, y = make_data(64)
    y[3] = INF  # the first batch overflows
    runs = {}
    for mode in ("eager", "traced", "unscaled"):
        with tfmp.policy_scope("fp16", hardware=tfmp.HardwareInfo("gpu", ("g",), ((7, 0),))):
            model = make_model()
        scaling = mode != "unscaled"
        opt = keras.optimizers.SGD(0.05)
        if scaling:
            opt = tfmp.wrap_optimizer(opt, "mixed_float16", initial_scale=2.0**12)

        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = ops.mean((model(xb, training=True) - yb) ** 2)
                loss = opt.scale_loss(loss) if scaling else loss
            grads = tape.gradient(loss, model.trainable_variables)
            if scaling:
                grads = tfmp.get_unscaled_gradients(opt, grads)
                opt.apply_unscaled(grads, model.trainable_variables)
            else:
                opt.apply(grads, model.trainable_variables)
            return tf.linalg.global_norm(grads)

        step = step if mode == "eager" else tf.function(step)
        first = 0 if scaling else 16  # the unscaled run sees the clean batches only
        norms = [float(step(x[i:i + 16], y[i:i + 16])) for i in range(first, 64, 16)]
        runs[mode] = (norms[-3:], model.get_weights(), _state(opt) if scaling else None)
    assert runs["eager"][2] == runs["traced"][2] == (2.0**11, 1, 3)  # backed off, 3 clean steps
    for mode in ("eager", "traced"):
        np.testing.assert_allclose(runs[mode][0], runs["unscaled"][0], rtol=1e-3)
        for a, b in zip(runs[mode][1], runs["unscaled"][1]):
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
