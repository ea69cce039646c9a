"""wrap_optimizer and parse_loss_scale."""

import logging as py_logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from tfmp import DynamicLossScaleOptimizer as DLSO
from tfmp.compensation import CompensatedOptimizer
from tfmp.compensation.optimizer import DEFAULT_ROUNDING


def test_fp16_gets_dynamic_scaling_with_args():
    inner = keras.optimizers.Adam()
    opt = tfmp.wrap_optimizer(inner, "fp16", min_scale=8.0, growth_interval=100)
    assert isinstance(opt, DLSO) and opt.inner_optimizer is inner
    assert (opt.dynamic, opt.min_scale, opt.growth_interval) == (True, 8.0, 100)
    assert tfmp.wrap_optimizer(opt) is opt
    assert tfmp.wrap_optimizer(opt, "fp16", min_scale=8.0) is opt  # idempotent when it matches


@pytest.mark.parametrize("kwargs, fragment", [
    ({"policy": "bf16"}, "policy 'mixed_bfloat16' needs no loss scaling, but the optimizer "
                         "scales dynamically from 32768"),
    ({"policy": "fp16", "loss_scale": 128}, "loss_scale=128 asks for a fixed scale, but the "
                                            "optimizer has a dynamic scale 32768"),
    ({"min_scale": 4.0}, "min_scale=4.0 but the optimizer has min_scale=8.0"),
    ({"growth_interval": 7}, "growth_interval=7 but the optimizer has growth_interval=100"),
])
def test_an_existing_optimizer_that_conflicts_with_the_request_raises(kwargs, fragment):
    opt = tfmp.wrap_optimizer(keras.optimizers.Adam(), "fp16", min_scale=8.0, growth_interval=100)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        tfmp.wrap_optimizer(opt, **kwargs)


def test_fixed_number_gives_fixed_scale():
    opt = tfmp.wrap_optimizer("sgd", "mixed_float16", loss_scale=128)
    assert isinstance(opt, DLSO) and isinstance(opt.inner_optimizer, keras.optimizers.SGD)
    assert (opt.dynamic, opt.initial_scale, opt.min_scale, opt.max_scale) == (False, 128.0, 128.0, 128.0)
    assert tfmp.wrap_optimizer("sgd", "fp16", loss_scale="0.5").initial_scale == 0.5


def test_follows_global_policy_by_default():
    keras.config.set_dtype_policy("mixed_float16")
    assert isinstance(tfmp.wrap_optimizer(keras.optimizers.SGD()), DLSO)
    keras.config.set_dtype_policy("float16")  # pure float16 computes in float16 too
    assert isinstance(tfmp.wrap_optimizer(keras.optimizers.SGD()), DLSO)
    keras.config.set_dtype_policy("float64")
    sgd64 = keras.optimizers.SGD()
    assert tfmp.wrap_optimizer(sgd64) is sgd64
    keras.config.set_dtype_policy("mixed_bfloat16")
    sgd = keras.optimizers.SGD()
    assert tfmp.wrap_optimizer(sgd) is sgd


@pytest.mark.parametrize("policy", ["bf16", "mixed_bfloat16", "float32", "fp32"])
def test_bf16_and_fp32_unchanged_unless_guard(policy):
    sgd = keras.optimizers.SGD()
    assert tfmp.wrap_optimizer(sgd, policy) is sgd
    guarded = tfmp.wrap_optimizer(sgd, policy, guard=True)
    assert isinstance(guarded, DLSO)
    assert (guarded.dynamic, guarded.initial_scale) == (False, 1.0)


def test_auto_policy_resolves(monkeypatch):
    monkeypatch.setenv("TFMP_PRECISION", "fp16")
    assert isinstance(tfmp.wrap_optimizer("adam", "auto"), DLSO)


def test_stock_loss_scale_optimizer_is_converted():
    stock = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(), initial_scale=512.0,
                                                dynamic_growth_steps=10)
    opt = tfmp.wrap_optimizer(stock, "fp16")
    assert isinstance(opt, DLSO) and opt.inner_optimizer is stock.inner_optimizer
    assert (opt.initial_scale, opt.growth_interval) == (512.0, 10)
    stock.build([keras.Variable(np.ones(2, "float32"))])
    with pytest.raises(ValueError, match="already been built"):
        tfmp.wrap_optimizer(stock, "fp16")


@pytest.mark.parametrize("bad", ["static", "-1", 0, -4.0, float("inf"), float("nan"), None, True])
def test_bad_loss_scale_is_named(bad):
    with pytest.raises(ValueError, match="loss_scale=.*'dynamic' or a positive number"):
        tfmp.wrap_optimizer("sgd", "fp16", loss_scale=bad)


def test_bad_policy_and_scale_args():
    with pytest.raises(ValueError, match="accepted"):
        tfmp.wrap_optimizer("sgd", "fp8")
    with pytest.raises(ValueError, match="min_scale=0"):
        tfmp.wrap_optimizer("sgd", "fp16", min_scale=0)


@pytest.mark.parametrize("policy", ["fp16", "bf16", "float32"])
@pytest.mark.parametrize("guard", [False, True])
def test_a_keyword_no_precision_takes_is_refused_under_every_precision(policy, guard):
    with pytest.raises(ValueError) as error:
        tfmp.wrap_optimizer("sgd", policy, guard=guard, foo=1, initail_scale=3)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "tfmp.wrap_optimizer() got keyword arguments no precision takes: foo=1, "
        "initail_scale=3 (did you mean initial_scale?); it takes optimizer, policy, loss_scale, "
        "guard, weights_dtype and DynamicLossScaleOptimizer's initial_scale, "), message
    assert message.endswith(", hysteresis, dynamic."), message
    dlso = tfmp.wrap_optimizer("sgd", "fp16", min_scale=2.0)  # an existing one: the same check
    with pytest.raises(ValueError, match=r"foo=1; it takes optimizer"):
        tfmp.wrap_optimizer(dlso, policy, guard=guard, foo=1)


@pytest.mark.parametrize("policy", ["bf16", "float32"])
def test_a_loss_scale_argument_only_float16_uses_is_ignored_with_one_line(policy, caplog):
    caplog.set_level(py_logging.WARNING)
    sgd = keras.optimizers.SGD()
    assert tfmp.wrap_optimizer(sgd, policy, hysteresis=2, min_scale=4.0) is sgd
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 1 and "hysteresis, min_scale ignored" in ignored[0], ignored


def test_guard_keeps_bf16_weights_finite_where_keras_writes_nan():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = np.random.RandomState(0).rand(64, 4).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    x[3, 0] = np.nan
    finite = {}
    for guard in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                                  keras.layers.Dense(1, dtype="float32")])
        opt = tfmp.wrap_optimizer(keras.optimizers.SGD(0.01), guard=guard)
        model.compile(opt, "mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        finite[guard] = all(np.isfinite(w).all() for w in model.get_weights())
        if guard:
            assert int(opt.skipped_steps.numpy()) == 2
    assert finite == {False: False, True: True}


def test_get_unscaled_gradients_plain_optimizer_is_identity():
    g = [tf.ones(2), None]
    assert tfmp.get_unscaled_gradients(keras.optimizers.SGD(), g) == g
    opt = DLSO(keras.optimizers.SGD(), initial_scale=4.0)
    out = tfmp.get_unscaled_gradients(opt, [tf.fill((2,), 8.0), None])
    np.testing.assert_array_equal(out[0].numpy(), [2.0, 2.0])
    assert out[1] is None


def test_an_optimizers_own_loss_scale_factor_becomes_the_fixed_scale():
    # Keras' LossScaleOptimizer turns the inner factor off without a word; tfmp keeps it.
    guarded = tfmp.wrap_optimizer(keras.optimizers.SGD(loss_scale_factor=8.0), "bf16", guard=True)
    assert (guarded.initial_scale, guarded.dynamic) == (8.0, False)
    assert guarded.inner_optimizer.loss_scale_factor is None  # not scaled twice
    fp16 = tfmp.wrap_optimizer(keras.optimizers.SGD(loss_scale_factor=8.0), "fp16")
    assert (fp16.initial_scale, fp16.dynamic, fp16.min_scale) == (8.0, False, 8.0)
    plain = keras.optimizers.SGD(loss_scale_factor=8.0)
    assert tfmp.wrap_optimizer(plain, "bf16") is plain and plain.loss_scale_factor == 8.0
    with pytest.raises(ValueError, match="loss_scale=1024 and the optimizer's loss_scale_factor=8.0"):
        tfmp.wrap_optimizer(keras.optimizers.SGD(loss_scale_factor=8.0), "fp16", loss_scale=1024)


def test_given_directly_the_inner_factor_is_turned_off_as_keras_does(caplog):
    # Keras' LossScaleOptimizer takes such an optimizer and updates with its own scale only
    # (its test_finite_step_with_inner_loss_scale); tfmp does too, and says so.
    caplog.set_level(py_logging.WARNING)
    inner = keras.optimizers.SGD(0.5, loss_scale_factor=100.0)
    opt = DLSO(inner, initial_scale=4.0)
    assert inner.loss_scale_factor is None and opt.initial_scale == 4.0
    assert "loss_scale_factor=100.0 is not used" in caplog.text
    variable = keras.Variable([1.0, 2.0])
    opt.apply([tf.constant([4.0, 8.0])], [variable])  # gradients of the loss scaled by 4
    np.testing.assert_allclose(variable.numpy(), [0.5, 1.0])  # unscaled by 4 only, lr 0.5


@pytest.mark.parametrize("policy, weights_dtype, guard, rounding", [
    ("bf16", "bfloat16", False, DEFAULT_ROUNDING),
    ("bf16", "bfloat16", True, DEFAULT_ROUNDING),
    ("fp16", "float16", False, "kahan"),  # stochastic rounding rounds to bfloat16 only
])
def test_weights_dtype_compensates_the_inner_optimizer(policy, weights_dtype, guard, rounding):
    inner = keras.optimizers.Adam()
    opt = tfmp.wrap_optimizer(inner, policy, guard=guard, weights_dtype=weights_dtype)
    assert isinstance(opt, DLSO) == (guard or policy == "fp16")
    assert getattr(opt, "inner_optimizer", opt) is inner  # compensated in place
    assert isinstance(inner, CompensatedOptimizer) and isinstance(inner, keras.optimizers.Adam)
    assert inner.rounding == rounding
    assert tfmp.wrap_optimizer(opt, policy, weights_dtype=weights_dtype) is opt  # kept as it is
    plain = tfmp.wrap_optimizer(keras.optimizers.Adam(), policy)  # weights_dtype=None
    assert type(getattr(plain, "inner_optimizer", plain)) is keras.optimizers.Adam


@pytest.mark.parametrize("optimizer, policy, weights_dtype, fragment", [
    (keras.optimizers.Adam, "float32", "bfloat16",
     "weights_dtype='bfloat16' does not fit the policy float32 (it computes in float32); use "
     "None (float32 weights), 'bfloat16' (under mixed_bfloat16) or 'float16' (under "
     "mixed_float16)"),
    (keras.optimizers.Adam, "fp16", "bfloat16", "does not fit the policy mixed_float16"),
    (keras.optimizers.Adam, "bf16", "bf16", "weights_dtype='bf16' is not accepted; use None"),
    (lambda: tfmp.compensate(keras.optimizers.Adam(), rounding="nearest"), "bf16", "bfloat16",
     "weights_dtype='bfloat16': CompensatedAdam has rounding='nearest'; use rounding="),
    (lambda: tfmp.compensate(keras.optimizers.Adam()), "fp16", "float16",
     "weights_dtype='float16': CompensatedAdam has rounding='stochastic'; use rounding='kahan'"),
])
def test_a_bad_weights_dtype_is_refused_and_the_optimizer_left_as_it_was(optimizer, policy,
                                                                        weights_dtype, fragment):
    given = optimizer()
    kind = type(given)
    with pytest.raises(ValueError) as error:
        tfmp.wrap_optimizer(given, policy, weights_dtype=weights_dtype)
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert type(given) is kind


def test_a_refused_scale_argument_leaves_the_optimizer_uncompensated():
    opt = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="initial_scale"):
        tfmp.wrap_optimizer(opt, "fp16", weights_dtype="float16", initial_scale=-1.0)
    assert type(opt) is keras.optimizers.Adam
