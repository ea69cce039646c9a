"""tfmp.compensation.rounding and random_bits: the numerics of writing 16-bit weights."""

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from tfmp.compensation import rounding
from tfmp.compensation.tf_ops import random_bits

BF16_ULP_AT_1 = 2.0 ** -7


def _f32(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")))


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    rng = np.random.RandomState(0)
    x = (rng.rand(64).astype("float32") - 0.5) * 10.0
    tiled = np.tile(x, (2000, 1))  # 2000 roundings of each value, every set a draw serves
    draws = np.concatenate([_f32(rounding.stochastic_round(
        tiled[k::3], rounding.split_bits(random_bits(tiled[k::3].shape, 7, 1), k)))
        for k in range(3)])
    # every draw is a bfloat16 value next to x
    assert np.all(np.abs(draws - x) <= 2.0 ** -7 * np.abs(x) + 1e-30)
    np.testing.assert_array_equal(_f32(ops.cast(draws, "bfloat16")), draws)
    # unbiased: the mean of 2000 draws is within 4 standard errors of x
    ulp = np.abs(x) * 2.0 ** -7
    err = np.abs(draws.mean(0) - x)
    assert np.all(err <= 4 * ulp / np.sqrt(2000) + 1e-7), err.max()
    # nearest rounding is biased: its error does not shrink
    assert np.mean(np.abs(_f32(rounding.nearest(x, "bfloat16")) - x)) > 5 * err.mean()


def test_one_draw_gives_three_uniform_pairwise_independent_sets_of_16_bits():
    sets = [np.asarray(rounding.split_bits(random_bits((200_000,), 3, 1), k)).astype("int64")
            for k in range(3)]
    for bits in sets:
        assert bits.min() >= 0 and bits.max() < 2 ** 16
        assert abs(bits.mean() / 2 ** 16 - 0.5) < 0.005
        assert abs(np.mean(bits < 2 ** 12) - 2 ** -4) < 0.003  # low values as often as due
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(np.corrcoef(sets[a], sets[b])[0, 1]) < 0.01
        # two roundings of a value halfway between neighbours: up together a quarter of the time
        both = np.mean((sets[a] >= 2 ** 15) & (sets[b] >= 2 ** 15))
        assert abs(both - 0.25) < 0.005, (a, b, both)


def test_stochastic_rounding_is_reproducible_and_each_stream_differs():
    x = np.full((1000,), 1.0 + BF16_ULP_AT_1 / 2, "float32")  # halfway: 50/50
    a = _f32(rounding.stochastic_round(x, rounding.split_bits(random_bits((1000,), 11, 5), 0)))
    b = _f32(rounding.stochastic_round(x, rounding.split_bits(random_bits((1000,), 11, 5), 0)))
    c = _f32(rounding.stochastic_round(x, rounding.split_bits(random_bits((1000,), 11, 6), 0)))
    d = _f32(rounding.stochastic_round(x, rounding.split_bits(random_bits((1000,), 12, 5), 0)))
    np.testing.assert_array_equal(a, b)
    assert 0.4 < np.mean(a > 1.0) < 0.6
    assert np.mean(a != c) > 0.3 and np.mean(a != d) > 0.3


def test_stochastic_rounding_keeps_inf_nan_and_never_overflows_a_finite_value():
    big = np.float32(3.39e38)  # rounded up: inf (bfloat16's largest is 3.3895e38); nearest: finite
    x = np.array([np.inf, -np.inf, np.nan, big, -big, 0.0, -0.0], "float32")
    bits = tf.fill((7,), 2 ** 16 - 1)  # round everything away from zero
    out = _f32(rounding.stochastic_round(x, bits))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    assert np.isfinite(out[3:5]).all() and out[5] == 0.0 and out[6] == 0.0
    assert out[3] == _f32(rounding.nearest(big, "bfloat16"))


def test_kahan_keeps_updates_nearest_loses():
    w = ops.cast(np.ones(4, "float32"), "bfloat16")
    c = ops.zeros((4,), "bfloat16")
    update = np.full(4, BF16_ULP_AT_1 / 10, "float32")  # a tenth of a unit: lost alone
    nearest = w
    for _ in range(100):
        w, c = rounding.kahan_add(w, c, update)
        nearest = rounding.nearest(ops.add(ops.cast(nearest, "float32"), update), "bfloat16")
    total = 1.0 + 100 * update[0]
    np.testing.assert_allclose(_f32(w) + _f32(c), total, rtol=2 ** -12)
    assert np.all(_f32(nearest) == 1.0)


def test_lost_counts_count_updates_float32_would_keep():
    before = np.array([1.0, 1.0, 1.0, 1.0], "float32")
    update = np.array([1e-3, 1.0, 0.0, 1e-9], "float32")  # 1e-9 is lost in float32 too
    after = rounding.nearest(before + update, "bfloat16")
    lost, counted = rounding.lost_counts(update, before, after, "nearest")
    assert (float(lost), float(counted)) == (1.0, 2.0)
    kept_in_buffer = (ops.zeros((4,)), ops.convert_to_tensor([1e-3, 0, 0, 0], "float32"))
    lost, counted = rounding.lost_counts(update, before, after, "kahan", kept_in_buffer)
    assert (float(lost), float(counted)) == (0.0, 2.0)
    lost, counted = rounding.lost_counts(update, before, after, "stochastic")
    assert (float(lost), float(counted)) == (0.0, 2.0)
