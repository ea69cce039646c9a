"""tools/train --weights_dtype=bfloat16, through the binary: 16-bit weights that train, are
recorded in summary.json, and resume after SIGKILL to the uninterrupted run's weights."""

import json
import os

import keras
import numpy as np

import helpers
from tfmp.compensation import CompensatedOptimizer

ARGS = ["--precision=bf16", "--weights_dtype=bfloat16", "--epochs=3", "--steps_per_epoch=30",
        "--batch_size=64"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _kill_after_the_second_backup(run):
    """Starts the run, SIGKILLs it as soon as its epoch-2 backup is complete (its metadata is
    written last): before the third epoch ends, however loaded the machine is."""
    helpers.kill_after_backup(["-m", "tools.train", *ARGS, f"--model_dir={run}"],
                              os.path.join(run, "backup"), _env())
    assert not os.path.exists(os.path.join(run, "summary.json"))


def _summary(run):
    with open(os.path.join(run, "summary.json")) as f:
        return json.load(f)


def test_bfloat16_weights_train_and_resume_after_sigkill_bit_identical(tmp_path):
    full, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    uninterrupted = helpers.zygote().start(["-m", "tools.train", *ARGS, f"--model_dir={full}"],
                                           env=_env())  # alongside the run that is killed
    _kill_after_the_second_backup(killed)
    resumed = helpers.run_tool("train", *ARGS, f"--model_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = uninterrupted.wait(timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "weights in bfloat16 (compensated optimizer; lost updates: " in done.stdout

    s = _summary(killed)
    assert s["resumed_from_epoch"] == 2 and s["epochs_completed"] == [2]
    assert (s["policy"], s["weights_dtype"], s["flags"]["weights_dtype"]) == (
        "mixed_bfloat16", "bfloat16", "bfloat16")
    a, b = (keras.models.load_model(run / "model.keras") for run in (full, killed))
    lost = s["lost_updates"]  # the monitor's figure: None under stochastic rounding
    if b.optimizer.inner_optimizer.rounding == "stochastic":
        assert lost is None and "lost updates: not measured)" in done.stdout
    else:
        assert 0.0 <= lost < 0.2
    dtypes = {v.path: v.dtype for v in a.weights}
    assert dtypes["dense_0/kernel"] == "bfloat16" and dtypes["logits/kernel"] == "float32", dtypes
    assert isinstance(b.optimizer.inner_optimizer, CompensatedOptimizer)
    for x, y in zip(a.weights, b.weights):  # the bf16 moments and the rounding restored
        assert x.dtype == y.dtype and np.asarray(x.numpy()).tobytes() == np.asarray(
            y.numpy()).tobytes(), x.path
    for x, y in zip(a.optimizer.variables, b.optimizer.variables):
        assert np.asarray(x.numpy()).tobytes() == np.asarray(y.numpy()).tobytes(), x.path
