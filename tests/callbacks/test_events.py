"""NanMonitor's diagnosis in real fits: data, divergence or precision, told apart by running
the bad batch again in float32 with the same weights (tfmp.rewrite.replay)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tfmp
from rewrite.overflow_models import Energy, chain, functional, task
from tfmp.callbacks import NanMonitor
from tfmp.callbacks import culprit as culprit_module
from tfmp.callbacks.events import DATA, DIVERGENCE, PRECISION, UNVERIFIED, Evidence, diagnose

GPU = tfmp.HardwareInfo("gpu", ("GPU:0",), ((7, 5),))  # float16 fast, bfloat16 not
BF16_CPU = tfmp.HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))
PLAIN_CPU = tfmp.HardwareInfo("cpu")
POLICIES = ["float32", "bf16", "fp16"]


class LogOneMinus(keras.layers.Layer):
    """log(1.0001 - min(|x|, 1)): finite in float32 (log 1e-4 at worst); in bfloat16 and
    float16 1.0001 rounds to 1, and every |x| >= 1 gives log(0) = -inf."""

    def call(self, x):
        return ops.log(1.0001 - ops.minimum(ops.abs(x), 1.0))


class AmplifiedGradient(keras.layers.Layer):
    """Identity forward; the gradient times 1e4, twice: past float16's range (65504), not
    float32's."""

    def call(self, x):
        @tf.custom_gradient
        def identity(t):
            big = tf.cast(1e4, t.dtype)
            return tf.identity(t), lambda dy: dy * big * big

        return identity(x)


class InjectedInf(keras.layers.Layer):
    """Identity forward; an inf gradient in every precision (no precision is to blame)."""

    def call(self, x):
        @tf.custom_gradient
        def identity(t):
            return tf.identity(t), lambda dy: dy * tf.cast(np.inf, dy.dtype)

        return identity(x)


def _fast(precision):
    """Hardware on which `precision` is no trap (no warning from prepare)."""
    return GPU if precision == "fp16" else BF16_CPU


def _fit(layer, precision, *, optimizer=None, x=None, hardware=PLAIN_CPU, patience=1,
         build=functional, also=None, **prepare_args):
    """The event that stops one epoch of `layer`'s model (with `also`: and the event a
    second monitor, advising for that hardware, saw)."""
    keras.utils.set_random_seed(0)
    model, opt = tfmp.prepare(build(layer), optimizer or keras.optimizers.Adam(1e-3),
                              precision, guard=True, hardware=_fast(precision), **prepare_args)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tx, ty = task(64)
    monitors = [NanMonitor("stop", patience=patience, hardware=h) for h in (hardware, also) if h]
    model.fit(tx if x is None else x, ty, epochs=1, batch_size=16, shuffle=False, verbose=0,
              callbacks=monitors)
    events = [m.stopped_event for m in monitors]
    assert None not in events, "no event"
    return events[0] if also is None else events


@pytest.mark.parametrize("precision", POLICIES)
def test_a_batch_holding_nan_is_data_in_every_precision(precision):
    x, _ = task(64)
    x[20, 3] = np.nan  # batch 1
    event = _fit(keras.layers.Identity(), precision, x=x)
    assert (event.kind, event.trigger, event.batch) == (DATA, "nonfinite_loss", 1)
    assert event.bad_inputs and "check the data" in event.fix
    assert "learning rate" not in event.fix and "float32" not in event.fix


@pytest.mark.parametrize("precision", POLICIES)
def test_a_huge_learning_rate_is_divergence_in_every_precision(precision):
    clip = precision == "bf16"  # one run already clips: clipping is then not advised
    opt = keras.optimizers.Adam(1e30, clipnorm=1.0 if clip else None)
    event = _fit(keras.layers.Identity(), precision, optimizer=opt, hardware=BF16_CPU)
    assert (event.kind, event.trigger) == (DIVERGENCE, "nonfinite_loss")
    assert "non-finite in float32 too, so precision is not the cause" in event.cause
    assert "the largest weight is now 1e+30" in event.cause or "hold inf/NaN" in event.cause
    assert event.fix.startswith("lower the learning rate (now 1e+30)")
    assert ("clip gradients" in event.fix) is not clip
    assert "float32_layers" not in event.fix and "bfloat16" not in event.fix
    assert "diagnosed as divergence" in event.message() and "outside its domain" not in event.fix


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_layer_past_the_16_bit_range_is_precision(precision):
    # Two monitors see the same event: one on hardware with native bfloat16, one without.
    event, plain = _fit(LogOneMinus(name="log_one_minus"), precision, hardware=BF16_CPU,
                        also=PLAIN_CPU)
    half = "bfloat16" if precision == "bf16" else "float16"
    for e in (event, plain):
        assert (e.kind, e.first_nonfinite_layer) == (PRECISION, "log_one_minus")
        assert f"in {half} and the same batch is finite in float32" in e.cause
        assert "float32_layers=['log_one_minus']" in e.fix and "learning rate" not in e.fix
    # bfloat16 only for a float16 run, and only where the hardware has it
    assert ("switch to bfloat16" in event.fix) is (precision == "fp16")
    assert "switch to bfloat16" not in plain.fix


def test_the_float16_overflow_locator_layer_is_precision():
    event = _fit(Energy(name="energy"), "fp16", hardware=GPU)
    assert (event.kind, event.first_nonfinite_layer) == (PRECISION, "energy")
    assert "float32_layers=['energy']" in event.fix and "bfloat16" not in event.fix


@pytest.mark.parametrize("layer, kind", [(AmplifiedGradient(), PRECISION),
                                         (InjectedInf(), DIVERGENCE)], ids=["amplified", "inf"])
def test_gradients_pinned_at_the_minimum_scale_are_replayed_with_gradients(layer, kind):
    after_weights = lambda l: chain(keras.layers.Dense(8, name="d0"), l)  # noqa: E731
    event = _fit(layer, "fp16", patience=2, initial_scale=2.0, min_scale=1.0, build=after_weights)
    assert (event.kind, event.trigger) == (kind, "scale_at_minimum")
    if kind == PRECISION:
        assert "too large for float16 (the same batch's gradients are finite in float32)" in event.cause
        # the scale, not clipping (it acts after the float16 backward pass has overflowed)
        assert "min_scale=0.00390625" in event.fix and "clip" not in event.fix
    else:
        assert "makes the gradients non-finite in float32 too" in event.cause


def test_the_replay_runs_only_for_an_event(monkeypatch):
    calls = []
    real = culprit_module.replay_in_float32
    monkeypatch.setattr(culprit_module, "replay_in_float32",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    keras.utils.set_random_seed(0)
    model, opt = tfmp.prepare(functional(keras.layers.Identity()), "adam", "bf16", guard=True,
                              hardware=BF16_CPU)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = task(64)
    nan = NanMonitor("skip", hardware=PLAIN_CPU)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[nan])
    assert not calls and not nan.events  # a clean run: nothing run again
    x[20, 0] = x[40, 0] = np.nan  # batches 1 and 2: bad data is not replayed in float32
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[nan])
    assert [e.kind for e in nan.events] == [DATA, DATA] and not calls
    model.optimizer.inner_optimizer.learning_rate.assign(1e30)
    model.fit(task(64)[0], y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[nan])
    assert [e.kind for e in nan.events[2:]] == [DIVERGENCE] * len(calls) and calls


def test_without_a_kept_batch_nothing_is_blamed_on_precision():
    e = Evidence("nonfinite_loss", "float16", "d/kernel", bfloat16_fast=False,
                 not_kept="under XLA or on a TPU it cannot be kept")
    kind, cause, fix = diagnose(e)
    assert kind == UNVERIFIED and "was not kept (under XLA" in cause
    assert "switch to bfloat16" not in fix and "lower the learning rate" in fix
    kind, _, fix = diagnose(Evidence("nonfinite_loss", None, bad_inputs=False,
                                     float32_finite=True))
    assert kind == UNVERIFIED and "16 bits" not in fix  # a float32 run that ran finite again


class Log(keras.layers.Layer):
    """log(x): NaN for the negative inputs of the task, in every precision."""

    def call(self, x):
        return ops.log(x)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_an_op_outside_its_domain_is_not_blamed_on_precision(precision):
    event = _fit(Log(name="log"), precision, hardware=BF16_CPU)
    assert event.kind == DIVERGENCE and "precision is not the cause" in event.cause
    assert "log's Log gets inputs outside its domain" in event.cause
    assert event.fix.startswith("check what log passes to Log")
    assert "float32_layers" not in event.fix and "bfloat16" not in event.fix


class TwoBranches(keras.Model):
    """A subclassed model (converted in place by prepare, and by the float32 replay) with a
    16-bit layer beside the one that overflows: the replay must blame the right one."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(8, name="d1")
        self.odd = LogOneMinus(name="log_one_minus")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(ops.concatenate([self.d1(x), self.odd(x)], axis=-1))


def test_a_subclassed_model_goes_on_training_after_its_events_are_replayed():
    keras.utils.set_random_seed(0)
    model = TwoBranches()
    odd = model.odd
    model(task(4)[0])
    model, opt = tfmp.prepare(model, "adam", "bf16", guard=True, hardware=BF16_CPU)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = task(64)
    nan = NanMonitor("skip", hardware=BF16_CPU)
    hist = model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[nan])
    # the traced step, put back after each replay's in-place float32 switch, ran on
    assert hist.epoch == [0, 1] and len(nan.events) == 8
    assert {(e.kind, e.first_nonfinite_layer) for e in nan.events} == {(PRECISION, "log_one_minus")}
    assert odd.dtype_policy.name == "mixed_bfloat16"


def test_a_16_bit_layer_among_float32_ones_is_replayed_in_float32():
    # Most layers compute in float32 (float32_layers and the head): the one 16-bit layer
    # still runs in float32 in the replay, and the run is still a bfloat16 run.
    event = _fit(LogOneMinus(name="log_one_minus"), "bf16", float32_layers=["d1", "concat"],
                 hardware=BF16_CPU)
    assert (event.kind, event.first_nonfinite_layer) == (PRECISION, "log_one_minus")
    assert "in bfloat16 and the same batch is finite in float32" in event.cause


def test_a_nan_sample_weight_is_data():
    keras.utils.set_random_seed(0)
    model, opt = tfmp.prepare(functional(keras.layers.Identity()), "adam", "bf16", guard=True,
                              hardware=BF16_CPU)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = task(64)
    weights = np.ones(64, "float32")
    weights[20] = np.nan
    nan = NanMonitor("stop", hardware=BF16_CPU)
    model.fit(x, y, sample_weight=weights, epochs=1, batch_size=16, shuffle=False, verbose=0,
              callbacks=[nan])
    assert (nan.stopped_event.kind, nan.stopped_event.batch) == (DATA, 1)


def test_under_mirrored_strategy_every_replicas_shard_is_checked():
    from helpers import mirrored
    from tfmp.callbacks.culprit import last_bad_batch
    x, y = task(64)
    x[24, 1] = np.nan  # batch 1, rows 16-31: in the second replica's half
    with mirrored().scope():
        keras.utils.set_random_seed(0)
        model, opt = tfmp.prepare(functional(keras.layers.Identity()), "adam", "bf16",
                                  guard=True, hardware=BF16_CPU)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    nan = NanMonitor("stop", hardware=BF16_CPU)
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[nan])
    assert (nan.stopped_event.kind, nan.stopped_event.batch) == (DATA, 1)
    np.testing.assert_array_equal(last_bad_batch(model)[0], x[16:32])  # both shards, in order


def test_without_the_loss_scale_optimizer_the_event_says_why_nothing_was_checked():
    keras.utils.set_random_seed(0)
    model, opt = tfmp.prepare(functional(keras.layers.Identity()), keras.optimizers.Adam(1e30),
                              "bf16", hardware=BF16_CPU)  # guard=False: Keras' own optimizer
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = task(64)
    nan = NanMonitor("stop", hardware=BF16_CPU)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[nan])
    event = nan.stopped_event
    assert event.kind == UNVERIFIED and "guard=True" in event.cause and "XLA" not in event.cause


def test_precision_is_never_blamed_without_a_float32_run():
    for finite in (None, False):
        kind, _, _ = diagnose(Evidence("nonfinite_loss", "float16", bad_inputs=False,
                                       layer="energy", float32_finite=finite))
        assert kind != PRECISION
