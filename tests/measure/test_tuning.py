"""tfmp.tune: the decision on given timings, a real measurement, and tools/train --precision=tune."""

import functools
import json

import keras
import pytest
import tensorflow as tf

import models
import tfmp
from tfmp.app import data, training
from tfmp.measure import Comparison, Verdict
from tfmp.precision import HardwareInfo
from tfmp.measure import choose

CPU = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))


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


def test_choose_respects_min_speedup_and_names_skipped_candidates():
    assert choose(_timed(mixed_bfloat16=(1.2, True)), {}, min_speedup=1.3).policy == "float32"
    result = choose(None, {"mixed_float16": "a trap here"})
    assert result.policy == "float32" and "a trap here" in result.reason


def test_tune_measures_on_the_model_and_skips_traps():
    d = data.synthetic("vector", 32, train_examples=256, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,), **d.model_kwargs())
    result = tfmp.tune(build, d.train, steps=6, hardware=CPU, tolerance=0.5)
    assert list(result.skipped) == ["mixed_float16"]  # emulated on a CPU: not run
    assert "trap" in result.skipped["mixed_float16"]
    assert list(result.speedups) == ["mixed_bfloat16"] and result.speedups["mixed_bfloat16"] > 0
    assert result.passed == {"mixed_bfloat16": True}
    assert result.policy in ("float32", "mixed_bfloat16")
    assert [r.policy for r in result.comparison.runs] == ["float32", "mixed_bfloat16"]
    json.dumps(result.to_dict())
    # min_speedup reaches the decision: no candidate is a million times faster.
    strict = tfmp.tune(build, d.train, steps=4, hardware=CPU, tolerance=0.5, min_speedup=1e6)
    assert strict.policy == "float32" and "reached 1e+06x" in strict.reason
    with pytest.raises(ValueError, match="candidates"):
        tfmp.tune(build, d.train, candidates=("auto",), hardware=CPU)


def test_train_with_precision_tune_records_and_keeps_the_choice(tmp_path):
    d = data.synthetic("vector", 32, train_examples=256, eval_examples=32)
    build = functools.partial(models.get("mlp")[0], hidden=(16,))
    config = training.TrainConfig(precision="tune", tune_steps=5, epochs=1, steps_per_epoch=2,
                                  batch_size=32, model_dir=str(tmp_path))
    summary = training.train(config, build, d, tf.distribute.get_strategy())
    assert summary["policy_source"] == "tune"
    assert summary["policy"] == summary["tune"]["policy"]
    assert set(summary["tune"]["speedups"]) <= {"mixed_bfloat16", "mixed_float16"}
    saved = json.loads((tmp_path / training.TUNED).read_text())
    assert saved["policy"] == summary["policy"]
    # A rerun in the same model_dir (a resume) keeps the tuned policy, whatever it was.
    saved["policy"] = "float32" if summary["policy"] != "float32" else "mixed_bfloat16"
    (tmp_path / training.TUNED).write_text(json.dumps(saved))
    again = training.train(config, build, d, tf.distribute.get_strategy())
    assert again["policy"] == saved["policy"] and "kept from" in again["policy_reason"]
    keras.config.set_dtype_policy("float32")
