"""tfmp.app.flags: tfmp's flags in a binary of the user's own (docs/binaries.md's `my_train.py`,
whose training run and its checks are in that document's own test), and `Job` for a loop of
the user's own."""

import os

import keras
import numpy as np
import pytest
from absl import flags
from sybil import Document
from sybil.parsers.markdown import PythonCodeBlockParser

import helpers

import tfmp
from tfmp.app import flags as tfmp_flags

BINARIES = os.path.join(helpers.ROOT, "docs", "binaries.md")


def documented_binary():
    """docs/binaries.md's example binary: the Python block that starts `# file: my_train.py`,
    as Sybil (conftest.py) parses it."""
    blocks = [str(region.parsed) for region in
              Document.parse(BINARIES, PythonCodeBlockParser())]
    (code,) = [b for b in blocks if b.startswith("# file: my_train.py\n")]
    return code


def test_the_documented_binary_refuses_bad_input_in_one_line(tmp_path):
    """Its training run (Model Garden's flags, summary.json, accuracy) is docs/binaries.md's."""
    code = documented_binary()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # Bad input: one line and exit 2 for tfmp's checks, absl's own error for an unknown flag.
    cases = [(["--dtype=bf16", "--precision=fp16"], "--precision=fp16 and --dtype=bf16 disagree"),
             (["--loss_scale=-3", "--dtype=fp16"], "--loss_scale"),
             (["--model=x"], None)]  # not one of its flags: absl's own error (exit 1)
    for argv, expected in cases:
        bad = helpers.zygote().run(["-c", code, *argv, "--epochs=1"], env=env, cwd=tmp_path)
        if expected is None:
            assert bad.returncode == 1 and "Unknown command line flag 'model'" in bad.stderr
            continue
        errors = [l for l in bad.stderr.splitlines() if ": error: " in l]
        assert bad.returncode == 2 and len(errors) == 1 and expected in errors[0], bad.stderr
        assert "Traceback" not in bad.stderr


def _flags(*argv, **define):
    fv = flags.FlagValues()
    tfmp_flags.define_flags(fv, **define)
    fv(["prog", *argv])
    return fv


def test_job_gives_a_loop_of_its_own_the_strategy_policy_prepared_model_and_callbacks(tmp_path):
    fv = _flags("--dtype=fp16", "--initial_scale=256", f"--model_dir={tmp_path}",
                "--nan_policy=skip", exclude=("batch_size",))
    assert "batch_size" not in fv and "model" not in fv and "dtype" in fv
    job = tfmp_flags.Job.from_flags(fv, batch_size=16)
    assert (job.config.batch_size, job.policy) == (16, "mixed_float16")
    assert keras.config.dtype_policy().name == "mixed_float16"
    x = np.random.RandomState(0).rand(64, 4).astype("float32")
    with job.strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model, optimizer = job.prepare(model, keras.optimizers.SGD(0.01))
        model.compile(optimizer, "mse")
    assert isinstance(optimizer, tfmp.DynamicLossScaleOptimizer) and optimizer.loss_scale == 256
    assert model.layers[-1].dtype_policy.name == "float32"  # the output kept in float32
    callbacks = job.callbacks()
    names = {type(c).__name__ for c in callbacks}
    assert {"LossScaleMonitor", "NanMonitor", "SafeBackupAndRestore", "TensorBoard"} <= names
    history = model.fit(x, x.sum(axis=1), batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    assert history.history["loss_scale"][-1] == 256 and os.path.isdir(tmp_path / "tensorboard")
    # The backup is removed once fit has ended: the binary's next run trains, not resumes.
    assert os.path.isdir(tmp_path) and not os.path.exists(tmp_path / "backup")
    again = model.fit(x, x.sum(axis=1), batch_size=16, epochs=2, verbose=0,
                      callbacks=job.callbacks())
    assert again.epoch == [0, 1]


def test_flag_values_become_a_config_with_overrides_and_refusals():
    fv = _flags("--distribution_strategy=mirrored", "--learning_rate=0.5", "--metrics=a,b",
                "--dataset=mnist", "--eval_split=train[90%:]", model_and_data=True,
                references=("mlp",))
    config = tfmp_flags.config_from_flags(fv, epochs=7)
    assert (config.strategy, config.learning_rate, config.metrics, config.epochs, config.model) == (
        "mirrored", 0.5, ("a", "b"), 7, "mlp")
    assert (config.dataset, config.train_split, config.eval_split) == (
        "mnist", "train", "train[90%:]")
    with pytest.raises(TypeError, match=r"\['nope'\]: not TrainConfig fields"):
        tfmp_flags.config_from_flags(fv, nope=1)
    with pytest.raises(ValueError, match=r"exclude=\['nope'\]: not tfmp flags"):
        tfmp_flags.define_flags(flags.FlagValues(), exclude=("nope",))
    with pytest.raises(tfmp_flags.ConfigError, match="--precision=tune measures the model"):
        tfmp_flags.Job.from_flags(_flags("--precision=tune"))
    # Without reference models --model has no default: the binary says which kinds it takes.
    assert _flags(model_and_data=True)["model"].value is None
