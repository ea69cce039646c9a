"""tools/train on the user's own model and data (tests/tools/userpkg, a package of its own on
PYTHONPATH), through the binary in child processes."""

import json
import os

import keras
import numpy as np
import pytest

import helpers

import tfmp  # noqa: F401  (registers tfmp's optimizer for load_model)

HERE = os.path.dirname(os.path.abspath(__file__))
USER = {"PYTHONPATH": HERE}  # where the user's package `userpkg` is
SHORT = ["--epochs=2", "--steps_per_epoch=30", "--batch_size=32", "--precision=fp32"]


def summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """The user's files: arrays with and without eval data, and a compiled `.keras` model."""
    import sys

    sys.path.insert(0, HERE)
    try:
        from userpkg import feed, nets
    finally:
        sys.path.remove(HERE)
    root = tmp_path_factory.mktemp("user")
    feed.write_npz(root / "with_eval.npz", eval_n=128)
    feed.write_npz(root / "train_only.npz")
    np.savez(root / "labels_too_big.npz", x=feed.arrays(64)[0], y=np.arange(64) % 8)
    np.savez(root / "wrong_width.npz", x=np.zeros((64, 5), "float32"), y=np.zeros(64, "int32"))
    np.savez(root / "no_y.npz", x=np.zeros((64, 6), "float32"))
    x = feed.arrays(64)[0]
    np.savez(root / "eval_wrong_width.npz", x=x, y=np.zeros(64, "int32"), x_eval=x[:, :4],
             y_eval=np.zeros(64, "int32"))
    np.savez(root / "string_labels.npz", x=x, y=np.array(["a", "b"] * 32))
    keras.utils.set_random_seed(0)
    nets.functional(compiled=True).save(root / "compiled.keras")
    lam = keras.Sequential([keras.Input((6,)), keras.layers.Lambda(lambda t: t * 2),
                            keras.layers.Dense(3)])
    lam.save(root / "lambda.keras")
    return root


@pytest.fixture(scope="module")
def user_runs(user_files):
    """One child trains each way the user's model and data can come (TensorFlow started once)."""
    root = user_files
    cases = {
        # first: the CPU is split into two devices before TensorFlow starts in the child
        "compiled+function": ["--model=userpkg.nets:functional",
                              '--model_args={"compiled": true, "width": 8}',
                              "--data=userpkg.feed:make", "--strategy=mirrored",
                              "--num_cpu_devices=2"],
        "uncompiled+npz_eval": ["--model=userpkg.nets:functional", "--model_args=softmax=True",
                                "--loss=sparse_categorical_crossentropy", "--metrics=accuracy",
                                "--learning_rate=0.01", f"--data={root}/with_eval.npz"],
        "subclassed+npz": ["--model=userpkg.nets:subclassed", "--model_args=width=12",
                           "--loss=sparse_categorical_crossentropy", "--optimizer=adamw",
                           "--metrics=sparse_categorical_accuracy",
                           "--learning_rate=0.03", f"--data={root}/train_only.npz"],
        "file+npz": [f"--model={root}/compiled.keras", f"--data={root}/with_eval.npz"],
        "zero_weights": ["--model=userpkg.nets:functional", '--model_args={"compiled": true}',
                         "--data=userpkg.feed:weighted"],
        "custom_parts": ["--model=userpkg.nets:custom_parts", "--data=userpkg.feed:make"],
        "reference+npz": ["--model=mlp", "--model_args=hidden=[16]", "--learning_rate=0.01",
                          f"--data={root}/with_eval.npz"],
        # --learning_rate replaces the compiled SGD's 0.1: the run diverges, and stops
        "diverges": ["--model=userpkg.nets:functional", '--model_args={"compiled": true}',
                     "--data=userpkg.feed:make", "--learning_rate=1e30"],
    }
    runs = helpers.run_tool_cases(
        "train", [[*SHORT, *argv, f"--model_dir={root / name}"] for name, argv in cases.items()],
        stdout=True, **USER)
    return {name: (*run, root / name) for name, run in zip(cases, runs)}


@pytest.mark.parametrize("name", ["uncompiled+npz_eval", "compiled+function", "subclassed+npz",
                                  "file+npz", "reference+npz", "custom_parts"])
def test_user_models_and_data_learn_through_the_binary(user_runs, name):
    code, stderr, out, run = user_runs[name]
    assert code == 0, stderr[-3000:]
    s = summary(run)
    accuracy = {**s["final_train_metrics"], **s["eval_metrics"]}
    accuracy = [v for k, v in accuracy.items() if k.endswith("accuracy")]
    assert accuracy and min(accuracy) > 0.6, s  # 3 classes: chance is 0.33
    assert os.path.exists(run / "model.keras") and "=== tfmp training summary ===" in out
    assert f"model {s['model']} on" in out


def test_a_compiled_model_keeps_its_loss_metrics_and_optimizer(user_runs):
    code, stderr, _, run = user_runs["compiled+function"]
    assert code == 0, stderr[-3000:]
    assert "optimizer SGD (the model's compile())" in stderr
    assert summary(run)["strategy"] == "MirroredStrategy" and summary(run)["replicas"] == 2
    kept = keras.models.load_model(run / "model.keras").optimizer.inner_optimizer.get_config()
    assert (kept["momentum"], kept["learning_rate"]) == pytest.approx((0.9, 0.1))  # the model's
    assert "sparse_categorical_accuracy" in summary(run)["final_train_metrics"]
    assert summary(run)["eval_metrics"]  # the function's (train, eval) pair
    _, stderr, _, run = user_runs["subclassed+npz"]
    assert "optimizer AdamW (flags)" in stderr and summary(run)["eval_metrics"] == {}
    assert "train_only.npz has no evaluation data: not evaluated" in stderr


def test_the_nan_stop_holds_for_a_user_model(user_runs):
    code, stderr, _, run = user_runs["diverges"]
    errors = [l for l in stderr.splitlines() if l.startswith("train.py: error:")]
    assert code == 1 and len(errors) == 1, stderr[-3000:]
    assert "training stopped on a NaN event" in errors[0] and "diagnosed as divergence" in errors[0]
    assert "lower the learning rate (now 1e+30)" in errors[0]
    assert summary(run)["stopped_by_nan"] and summary(run)["nan_events"][0]["kind"] == "divergence"


def test_sample_weights_reach_the_loss_and_own_batching_is_said(user_runs):
    """Every weight 0: the weighted loss is exactly 0 (ignored weights would leave ~1.1)."""
    code, stderr, _, run = user_runs["zero_weights"]
    assert code == 0, stderr[-3000:]
    assert summary(run)["final_train_metrics"]["loss"] == 0.0
    # It batches by 16 whatever it is given: said once, before training.
    assert stderr.count("userpkg.feed:weighted's first training batch holds 16 examples, not "
                        "--batch_size=32") == 1
    _, stderr, _, _ = user_runs["compiled+function"]
    assert "first training batch holds" not in stderr


def test_the_user_model_file_round_trips(user_runs):
    """The subclassed model's `.keras` loads again where its module is importable."""
    import sys

    sys.path.insert(0, HERE)
    try:
        import userpkg.nets  # noqa: F401  (registers Small)
        model = keras.models.load_model(user_runs["subclassed+npz"][3] / "model.keras")
    finally:
        sys.path.remove(HERE)
    assert type(model).__name__ == "Small" and model.width == 12


BAD = [
    (["--model=userpkg.broken:build"],
     "--model=userpkg.broken:build: cannot import 'userpkg.broken' (RuntimeError: no GPU "
     "driver here)"),
    (["--model=userpkg.nets:missing"], "'missing' is not defined there"),
    (["--model=userpkg.nets:not_a_model", "--loss=mse"], "returned a int, not a Keras model"),
    (["--model=userpkg.nets:functional", "--model_args=depth=3", "--loss=mse"],
     "unexpected keyword argument 'depth'"),
    (["--model=userpkg.nets:raises", "--loss=mse"],
     "--model=userpkg.nets:raises failed: RuntimeError: out of memory building the model"),
    (["--model=mlp", "--model_args=bogus=1"], "--model=mlp with --model_args {{'bogus': 1}} failed: "
     "TypeError"),
    (["--model=userpkg.nets:functional", "--model_args=oops"], "'oops' is not key=value"),
    (["--model=nothing_like_it"], "--model='nothing_like_it' is not accepted: give mlp, cnn, "
     "transformer, package.module:function"),
    (["--model=/no/such/model.keras"], "--model='/no/such/model.keras' does not exist"),
    (["--model={root}/lambda.keras"], "safe mode does not run"),
    (["--model={root}/compiled.keras", "--model_args=width=3"], "takes none"),
    (["--model=userpkg.nets:functional"], "is not compiled: give --loss"),
    (["--model=userpkg.nets:subclassed", "--loss=mse"],
     "--data=synthetic is made for the model's inputs, which cannot be read off it"),
    (["--model=mlp", "--loss=nope"], "--loss: 'nope' is not a Keras loss name"),
    (["--model=mlp", "--metrics=accuracy,nope"], "--metrics: 'nope' is not a Keras metrics"),
    (["--optimizer=adamx"], "--optimizer='adamx' is not a Keras optimizer: give one of adadelta"),
    (["--data=userpkg.feed:not_a_dataset"], "returned a list as its training data"),
    (["--model={root}/compiled.keras", "--data=userpkg.feed:empty_eval"],
     "--data=userpkg.feed:empty_eval returned an empty evaluation dataset"),
    (["--model={root}/compiled.keras", "--data={root}/eval_wrong_width.npz"],
     "eval_wrong_width.npz's inputs do not fit the model"),
    (["--model={root}/compiled.keras", "--data={root}/string_labels.npz"],
     "string_labels.npz's training labels do not fit the model's outputs, loss or metrics"),
    (["--model={root}/compiled.keras", "--data=userpkg.feed:make", "--metrics=auc"],
     "userpkg.feed:make's training labels do not fit the model's outputs, loss or metrics"),
    (["--model=userpkg.nets:two_heads", "--data=userpkg.feed:two_targets", "--precision=tune"],
     "--precision=tune measures one loss"),
    (["--model=userpkg.nets:functional", "--loss=mse", "--data=userpkg.feed:unbatched"],
     "inputs do not fit the model"),
    (["--model={root}/compiled.keras", "--data=userpkg.feed:endless"],
     "is not known (an endless dataset, TFRecord files, a filter): give --steps_per_epoch"),
    (["--model={root}/compiled.keras", "--data={root}/wrong_width.npz"],
     "inputs do not fit the model"),
    (["--model={root}/compiled.keras", "--data={root}/no_y.npz"], "give arrays x and y"),
    (["--model={root}/compiled.keras", "--data={root}/nowhere.npz"], "cannot read it as .npz"),
    (["--model={root}/compiled.keras", "--data={root}/labels_too_big.npz"],
     "labels range over [0, 7], but a sparse categorical loss takes class indices 0..2"),
]


def test_bad_user_input_is_one_line_and_exit_2(user_files):
    cases = [[a.format(root=user_files) for a in argv] + ["--epochs=1", "--batch_size=32"] +
             ([] if "endless" in argv[-1] else ["--steps_per_epoch=2"]) for argv, _ in BAD]
    for (argv, expected), (code, stderr) in zip(BAD, helpers.run_tool_cases("train", cases,
                                                                            **USER)):
        errors = [l for l in stderr.splitlines() if l.startswith("train.py: error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, (argv, stderr[-2000:])
        assert expected.format(root=user_files) in errors[0], (argv, errors[0])


def test_a_user_model_resumes_after_sigkill_to_the_uninterrupted_weights(user_files, tmp_path):
    """The subclassed model on the user's data function, its order drawn from the seed and
    the pass (`shuffled_passes`): killed after its second epoch's backup, rerun, it ends with
    the weights of a run never interrupted. (A pipeline that reshuffles every pass with
    `shuffle(seed=...)` is replayed in another order under a distribution strategy: the
    README says so.)"""
    args = ["-m", "tools.train", "--model=userpkg.nets:subclassed", "--model_args=width=12",
            "--loss=sparse_categorical_crossentropy", "--optimizer=sgd", "--learning_rate=0.05",
            "--data=userpkg.feed:make_resumable", "--epochs=3", "--steps_per_epoch=40",
            "--batch_size=32", "--precision=fp32"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **USER)
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = helpers.zygote().start([*args, f"--model_dir={full}"], env=env)
    helpers.kill_after_backup([*args, f"--model_dir={killed}"], str(killed / "backup"), env)
    assert not (killed / "summary.json").exists()
    resumed = helpers.zygote().run([*args, f"--model_dir={killed}"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = uninterrupted.wait(timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert summary(killed)["resumed_from_epoch"] == 2 and summary(killed)["epochs_completed"] == [2]
    import sys

    sys.path.insert(0, HERE)
    try:
        import userpkg.nets  # noqa: F401
        a, b = (keras.models.load_model(run / "model.keras") for run in (full, killed))
    finally:
        sys.path.remove(HERE)
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_tune_and_float32_layers_auto_run_on_the_user_model_and_data(user_files):
    """--precision=tune measures the user's model with its compiled loss on the user's batches
    (under MirroredStrategy: XLA, which it refuses, is not measured, and nothing is compiled by
    XLA; tests/measure/test_tuning.py measures the XLA arms); --float32_layers=auto calibrates
    on the user's batches (inputs 2e4 times larger: the hidden layer overflows float16 on them,
    not on the synthetic task)."""
    model = ["--model=userpkg.nets:functional", '--model_args={"compiled": true}',
             "--epochs=1", "--steps_per_epoch=3", "--batch_size=32"]
    tune_dir, auto_dir = user_files / "tuned", user_files / "auto"
    runs = helpers.run_tool_cases("train", [
        [*model, "--data=userpkg.feed:make", "--precision=tune", "--tune_steps=3",
         "--strategy=mirrored", "--num_cpu_devices=2", f"--model_dir={tune_dir}"],  # CPU split first
        [*model, "--data=userpkg.feed:loud", "--precision=fp16", "--float32_layers=auto",
         f"--model_dir={auto_dir}"]], **USER)
    for code, stderr in runs:
        assert code == 0, stderr[-3000:]
    tuned = summary(tune_dir)["tune"]
    assert tuned["policy"] == summary(tune_dir)["policy"] and tuned["speedups"]
    assert "MirroredStrategy over 2 replicas" in tuned["skipped"]["xla"]
    assert tuned["loss"].startswith("SparseCategoricalCrossentropy(from_logits=True)")
    s = summary(auto_dir)
    assert s["policy"] == "mixed_float16" and "hidden" in s["float32_layers"], s["float32_layers"]
