"""tfmp.tune: the decision on given timings, a real measurement, and tools/train --precision=tune."""

import dataclasses
import functools
import json
import zipfile

import keras
import pytest
import tensorflow as tf

import models
import tfmp
from tfmp.app import data, training
from tfmp.measure import Comparison, Verdict
from tfmp.precision import HardwareInfo
from tfmp.measure.tuning import choose

CPU = HardwareInfo("cpu")  # bfloat16 emulated: no bf16w candidate by default
CPU_BF16 = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))


def _timed(**speed_and_pass):
    """A Comparison whose candidates have the given (median speed-up, passed)."""
    verdicts = tuple(Verdict(name, 0.01 if ok else 0.5, (1.0,) * 3, (s * 0.9, s, s * 1.1), ok,
                             "given") for name, (s, ok) in speed_and_pass.items())
    return Comparison(0.05, 10, (), verdicts)


@pytest.mark.parametrize("timings,chosen", [
    ({"mixed_bfloat16": (1.4, True), "mixed_float16": (1.8, True)}, "mixed_float16"),
    ({"mixed_bfloat16": (1.4, True), "mixed_float16": (1.8, False)}, "mixed_bfloat16"),
    ({"mixed_bfloat16": (1.02, True)}, "float32"),  # within the noise: not worth it
    ({"mixed_bfloat16": (0.8, True)}, "float32"),  # 16 bits cannot pay on this model
    ({"mixed_bfloat16": (2.0, False)}, "float32"),  # fast but numerically off
])
def test_choose_takes_the_fastest_passing_candidate(timings, chosen):
    result = choose(_timed(**timings), {})
    assert result.policy == chosen
    assert result.speedups == {k: s for k, (s, _) in timings.items()}
    for name, (speed, _) in timings.items():
        assert f"{name} {speed:.2f}x" in result.reason  # the figures are in the reason


@pytest.mark.parametrize("timings,chosen", [
    # the avx512_bf16 EPYC's default transformer: float32 + XLA wins, bf16 + XLA is slower
    ({"float32+xla": (1.16, True), "mixed_bfloat16": (0.98, True),
      "mixed_bfloat16+xla": (0.9, True)}, ("float32", True)),
    ({"float32+xla": (1.16, True), "mixed_bfloat16": (1.3, True),
      "mixed_bfloat16+xla": (1.5, True)}, ("mixed_bfloat16", True)),
    ({"float32+xla": (1.2, True), "mixed_bfloat16": (1.3, True),
      "mixed_bfloat16+xla": (1.5, False)}, ("mixed_bfloat16", False)),
    ({"float32+xla": (1.03, True), "mixed_bfloat16": (1.0, True)}, ("float32", False)),
    ({" BF16 + XLA ": (1.5, True), "bf16": (1.2, True)}, ("mixed_bfloat16", True)),  # any case
])
def test_choose_picks_the_policy_and_xla_together(timings, chosen):
    result = choose(_timed(**timings), {})
    assert (result.policy, result.jit_compile) == chosen
    assert result.to_dict()["jit_compile"] is chosen[1]
    assert all(f"{name} {speed:.2f}x" in result.reason for name, (speed, _) in timings.items())


def test_where_the_hardware_has_bfloat16_bfloat16_weights_are_a_candidate():
    d = data.synthetic("vector", 32, train_examples=128, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,), **d.model_kwargs())
    # min_speedup reaches the decision: no candidate is a million times faster.
    result = tfmp.tune(build, d.train, steps=3, hardware=CPU_BF16, tolerance=0.5, xla=False,
                       min_speedup=1e6)
    assert list(result.speedups) == ["mixed_bfloat16", tfmp.measure.tuning.BF16_WEIGHTS]
    assert [(r.policy, r.weights_dtype) for r in result.comparison.runs] == [
        ("float32", None), ("mixed_bfloat16", None), ("mixed_bfloat16", "bfloat16")]
    assert not any(r.jit_compile for r in result.comparison.runs) and not result.jit_compile
    assert result.policy == "float32" and "reached 1e+06x" in result.reason
    chosen = choose(_timed(mixed_bfloat16=(1.2, True), bf16w=(1.4, True)), {})
    assert (chosen.policy, chosen.weights_dtype) == ("mixed_bfloat16", "bfloat16")
    assert chosen.to_dict()["weights_dtype"] == "bfloat16"
    assert choose(_timed(mixed_bfloat16=(1.4, True), bf16w=(1.2, True)), {}).weights_dtype is None


def test_choose_respects_min_speedup_and_names_skipped_candidates():
    assert choose(_timed(mixed_bfloat16=(1.2, True)), {}, min_speedup=1.3).policy == "float32"
    result = choose(None, {"mixed_float16": "a trap here"})
    assert result.policy == "float32" and "a trap here" in result.reason


def _measured_on_the_model_skipping_traps(result):
    """tfmp.tune's choice on a CPU (by default, with XLA): every arm measured but float16's."""
    assert list(result.skipped) == ["mixed_float16"]  # emulated on a CPU: not run
    assert "trap" in result.skipped["mixed_float16"]
    labels = ["float32+xla", "mixed_bfloat16", "mixed_bfloat16+xla"]
    assert list(result.speedups) == labels and min(result.speedups.values()) > 0
    assert result.passed == dict.fromkeys(labels, True)
    assert result.policy in ("float32", "mixed_bfloat16")
    runs = result.comparison.runs
    assert [(r.policy, r.jit_compile) for r in runs] == [
        ("float32", False), ("float32", True), ("mixed_bfloat16", False), ("mixed_bfloat16", True)]
    json.dumps(result.to_dict())


def test_tune_refuses_auto_and_a_bad_xla():
    # What tune measures (every arm, float16 skipped as a trap): on the run of
    # test_train_with_precision_tune_..., _measured_on_the_model_skipping_traps; xla=False
    # and min_speedup: test_where_the_hardware_has_bfloat16_...; xla="only": --jit_compile's.
    d = data.synthetic("vector", 32, train_examples=128, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,), **d.model_kwargs())
    with pytest.raises(ValueError, match="candidates"):
        tfmp.tune(build, d.train, candidates=("auto",), hardware=CPU)
    with pytest.raises(ValueError, match="xla='yes' must be True, False or 'only'"):
        tfmp.tune(build, d.train, hardware=CPU, xla="yes")


class HostOp(keras.layers.Layer):
    """The identity through a host (NumPy) function: an op XLA has no kernel for."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def test_xla_is_refused_under_a_multi_replica_strategy_and_dropped_where_it_cannot_compile():
    d = data.synthetic("vector", 32, train_examples=128, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,), **d.model_kwargs())
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = tfmp.tune(build, d.train, steps=3, hardware=CPU, tolerance=0.5, strategy=mirrored)
    assert "MirroredStrategy over 2 replicas fails" in result.skipped["xla"]
    assert list(result.speedups) == ["mixed_bfloat16"] and not result.jit_compile

    def host_model():
        inputs = keras.Input((64,))
        return keras.Model(inputs, keras.layers.Dense(10)(HostOp()(inputs)))

    # The XLA arms fail to compile (no XLA kernel for the host op): each is dropped with
    # the op named, the rest measured. This also shows the +xla arms are compiled by XLA.
    result = tfmp.tune(host_model, d.train, steps=3, hardware=CPU, tolerance=0.5)
    for label in ("float32+xla", "mixed_bfloat16+xla"):
        assert result.skipped[label].startswith("XLA could not compile this model's train step")
        assert "PyFunc" in result.skipped[label] and "\n" not in result.skipped[label]
    assert list(result.speedups) == ["mixed_bfloat16"] and not result.jit_compile


def test_an_error_that_is_not_xla_is_raised_with_the_policy_that_hit_it():
    d = data.synthetic("vector", 32, train_examples=128, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,), **d.model_kwargs())
    bad_labels = d.train.map(lambda x, y: (x, y + 99))  # outside the 10 classes
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        tfmp.tune(build, bad_labels, steps=3, hardware=CPU, tolerance=0.5)
    assert raised.value.tfmp_arm == "float32"  # the baseline's step, not an XLA one


def test_xla_refusal_names_multi_replica_strategies_only():
    from tfmp.distribute.strategies import xla_refusal

    assert xla_refusal(tf.distribute.MirroredStrategy(["/cpu:0"])) is None  # one replica
    assert xla_refusal(tf.distribute.get_strategy()) is None and xla_refusal(None) is None
    assert xla_refusal(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])).startswith(
        "with MirroredStrategy over 2 replicas fails in Keras 3.15")


def test_a_tuned_xla_choice_is_dropped_where_the_strategy_cannot_run_it():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert training._tuned_xla({"jit_compile": True}, tf.distribute.get_strategy())
    assert not training._tuned_xla({"jit_compile": False}, tf.distribute.get_strategy())
    assert not training._tuned_xla(None, tf.distribute.get_strategy())
    assert not training._tuned_xla({"jit_compile": True}, mirrored)


def test_train_with_precision_tune_records_and_keeps_the_choice(tmp_path, monkeypatch):
    # bfloat16 emulated: no bf16w arms (test_where_the_hardware_has_bfloat16_... measures them)
    monkeypatch.setattr(training, "detect_hardware", lambda strategy=None: CPU)
    tuned, tune = [], training.tune  # what tfmp.tune gave the binary, each run's

    def recorded(*args, **kwargs):
        tuned.append(tune(*args, **kwargs))
        return tuned[-1]

    monkeypatch.setattr(training, "tune", recorded)
    d = data.synthetic("vector", 32, train_examples=256, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,))
    config = training.TrainConfig(precision="tune", tune_steps=5, epochs=1, steps_per_epoch=2,
                                  batch_size=32, model_dir=str(tmp_path))
    summary = training.train(config, build, d, tf.distribute.get_strategy())
    assert len(tuned) == 1 and summary["tune"] == tuned[0].to_dict()
    _measured_on_the_model_skipping_traps(tuned[0])
    assert summary["policy_source"] == "tune"
    assert summary["policy"] == summary["tune"]["policy"]
    assert summary["jit_compile"] == summary["tune"]["jit_compile"] == _compiled_with_xla(tmp_path)
    assert set(summary["tune"]["speedups"]) <= {
        "float32+xla", "mixed_bfloat16", "mixed_bfloat16+xla", "mixed_float16"}
    assert summary["weights_dtype"] is summary["tune"]["weights_dtype"] is None
    saved = json.loads((tmp_path / training.TUNED).read_text())
    assert (saved["policy"], saved["jit_compile"]) == (summary["policy"], summary["jit_compile"])
    # A rerun in the same model_dir (a resume) keeps the tuned choice, whatever it was: here
    # bf16w (mixed_bfloat16 with bfloat16 weights), trained with its bfloat16 weights.
    saved.update(policy="mixed_bfloat16", weights_dtype="bfloat16",
                 jit_compile=not saved["jit_compile"])
    (tmp_path / training.TUNED).write_text(json.dumps(saved))
    again = training.train(config, build, d, tf.distribute.get_strategy())
    assert again["policy"] == saved["policy"] and "kept from" in again["policy_reason"]
    assert again["weights_dtype"] == "bfloat16"
    assert again["jit_compile"] == saved["jit_compile"] == _compiled_with_xla(tmp_path)
    assert len(tuned) == 1  # nothing measured again
    # --jit_compile compiles with XLA whatever tune picks: tune measures XLA arms only
    # (tune(xla="only"): float32+xla and each candidate that is no trap here, with XLA).
    forced = dataclasses.replace(config, jit_compile=True, model_dir=str(tmp_path / "xla"))
    summary = training.train(forced, build, d, tf.distribute.get_strategy())
    assert list(summary["tune"]["speedups"]) == ["float32+xla", "mixed_bfloat16+xla"], (
        summary["tune"])
    assert [(r.policy, r.jit_compile) for r in tuned[1].comparison.runs] == [
        ("float32", False), ("float32", True), ("mixed_bfloat16", True)]
    assert summary["jit_compile"] and _compiled_with_xla(tmp_path / "xla")
    keras.config.set_dtype_policy("float32")


def _compiled_with_xla(model_dir):
    """`jit_compile` of the saved model's compile config: what fit really ran with."""
    with zipfile.ZipFile(model_dir / training.FINAL_MODEL) as saved:
        return json.loads(saved.read("config.json"))["compile_config"]["jit_compile"]
