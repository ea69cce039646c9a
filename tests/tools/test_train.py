"""tools/train.py end to end, in subprocesses (the README's main job)."""

import json
import os
import re

import keras
import pytest

import helpers

import tfmp  # noqa: F401  (registers tfmp's layers and optimizer for load_model)


def env(**extra):
    """The environment now (conftest removed TFMP_PRECISION), not at import time."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)


def train(*args, timeout=300, **extra_env):
    return helpers.run_tool("train", *args, timeout=timeout, **extra_env)


def summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return json.load(f)


def test_default_run_no_flags(child_runs):
    code, stderr, out = child_runs["default"]  # no flag at all, in the shared child
    assert code == 0, stderr[-2000:]
    assert "=== tfmp training summary ===" in out and "model mlp on synthetic" in out
    accuracy = float(out.split("eval_accuracy=")[1].split(",")[0])
    assert accuracy > 0.5  # 10 classes: chance is 0.1
    # What a person reads: counters as whole numbers, the auto reason, epochs from 1.
    assert "loss_scale: 1 - nan_losses: 0 - skipped_steps: 0" in out and "e+00" not in out
    assert "epochs 1-3 of 3" in out
    # After training, evaluation says what it does and shows Keras' progress (a line in a log),
    # its metrics without the loss-scale counters.
    assert "tfmp: evaluating on synthetic's evaluation split" in stderr
    lines = out.splitlines()
    evaluation = lines[lines.index("Epoch 3/3") + 2]
    assert re.fullmatch(r"\d+/\d+ - .* - accuracy: [\d.]+ - loss: [\d.]+", evaluation), evaluation
    assert "asked for explicitly" not in stderr
    hw = tfmp.detect_hardware()
    assert f"precision policy {hw.recommended_policy} ({hw.reason})" in stderr


def _auto():
    """What `auto` resolves to on the CPU the tests run on (never assumed)."""
    return tfmp.detect_hardware().recommended_policy


STRATEGY_CASES = [  # MirroredStrategy first: the CPU is split before TensorFlow initializes
    (["--distribution_strategy=mirrored", "--num_cpu_devices=2"], "MirroredStrategy", 2, None),
    (["--strategy=default", "--precision=BF16", "--float32_layers=dense_0"],
     "_DefaultDistributionStrategy", 1, "mixed_bfloat16"),  # any case; bf16 on every CPU (the
    # model is tiny); a layer kept in float32 by name (test_float32_layers_by_name_...)
    (["--strategy=one_device"], "OneDeviceStrategy", 1, None),
]


def _check_strategy_run(model_dir, strategy, replicas, policy=None):
    s = summary(model_dir)
    assert (s["strategy"], s["replicas"]) == (strategy, replicas)
    assert s["policy"] == (policy or _auto())  # None: what auto picks on this CPU
    assert s["policy_source"] == ("explicit" if policy else "auto")
    assert s["final_train_metrics"]["loss"] < 2.3  # below chance-level cross-entropy


@pytest.fixture(scope="module")
def fit_runs(child_runs):
    """The four strategies, float16 with accumulation, a NaN stop (see `child_runs`)."""
    return child_runs["fit"]


def test_strategies(fit_runs):
    tmp_path, runs = fit_runs
    for i, ((code, stderr), (_, strategy, replicas, policy)) in enumerate(
            zip(runs["strategies"], STRATEGY_CASES)):
        assert code == 0, stderr[-2000:]
        _check_strategy_run(tmp_path / str(i), strategy, replicas, policy)
        assert "shuffle=True" not in stderr  # tfmp's fit on its own shuffled dataset: no noise
    s = summary(tmp_path / "1")  # --precision=BF16: the guard's fixed scale of 1
    assert s["loss_scale"]["mode"] == "guard" and s["loss_scale"]["loss_scale_end"] == 1.0
    assert [s["flags"][k] for k in ("initial_scale", "growth_interval", "min_scale")] == [None] * 3


def test_single_worker_multi_worker_strategy(fit_runs):
    tmp, runs = fit_runs
    code, stderr = runs["mwms"]  # after the other strategies' runs in the shared child
    assert code == 0, stderr[-2000:]
    _check_strategy_run(tmp / "mwms", "CollectiveAllReduceStrategy", 1)  # the MWMS class
    assert summary(tmp / "mwms")["cluster"] is None  # no TF_CONFIG: this host alone


def test_fp16_accumulation_remat_and_model_garden_flags(fit_runs):
    tmp, runs = fit_runs
    tmp_path = tmp / "fp16"
    code, stderr = runs["fp16"]
    assert code == 0, stderr[-2000:]
    # Each phase after training says what it does: evaluation, then one line per file written.
    said = [l.split("] ", 1)[-1] for l in stderr.splitlines() if "tfmp: evaluating" in l
            or "tfmp: writing" in l]
    assert said == ["tfmp: evaluating on synthetic's evaluation split",
                    f"tfmp: writing {tmp_path / 'model.keras'}",
                    f"tfmp: writing {tmp_path / 'summary.json'}"]
    # The trap is said once, as an absl line (not again as a Python RuntimeWarning).
    assert len([l for l in stderr.splitlines() if "mixed_float16 on a CPU-only host is a trap"
                in l]) == 1 and "Warning" not in stderr
    s = summary(tmp_path)
    assert s["policy"] == "mixed_float16" and s["policy_source"] == "explicit"
    assert s["flags"]["grad_accum_steps"] == 2 and s["flags"]["remat"] is True
    assert s["loss_scale"]["loss_scale_start"] == 256.0
    # The values the optimizer used, the default floor included (not null).
    assert (s["flags"]["initial_scale"], s["flags"]["growth_interval"], s["flags"]["min_scale"],
            s["loss_scale"]["mode"]) == (256.0, 5, 1.0, "dynamic")
    model = keras.models.load_model(os.path.join(tmp_path, "model.keras"))
    opt = model.optimizer
    assert opt.growth_interval == 5 and int(opt.skipped_steps.numpy()) == 0
    # 40 micro-batches, 20 optimizer updates: the scale grew every 5 updates, 4 times.
    assert int(opt.inner_optimizer._iterations.numpy()) == 40  # micro-batches
    assert int(opt.inner_optimizer.iterations.numpy()) == 20  # optimizer updates
    assert s["loss_scale"]["loss_scale_end"] == 256.0 * 2**4
    assert s["float32_layers"] == {}  # --float32_layers=auto: the reference MLP has no overflow


def test_float32_layers_by_name_are_kept_and_recorded(fit_runs):
    tmp, runs = fit_runs
    code, stderr = runs["strategies"][1]  # --precision=BF16 --float32_layers=dense_0
    assert code == 0, stderr[-2000:]
    s = summary(tmp / "1")
    assert s["float32_layers"] == {"dense_0": "given in float32_layers"}
    model = keras.models.load_model(os.path.join(tmp / "1", "model.keras"))
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies["dense_0"] == "float32" and policies["dense_1"] == "mixed_bfloat16"


BAD_INPUT = [
    (["--precision=fp8"], "flag --precision=fp8: value should be one of", 1),
    (["--dtype=fp16", "--float32_layers=nonexistent"], "no layer of 'mlp' is named 'nonexistent'", 2),
    (["--batch_size=0"], "flag --batch_size=0: 0 is not a positive integer", 1),
    (["--loss_scale=-3"], "--loss_scale='-3' is not accepted; use 'dynamic' or a positive", 2),
    (["--dtype=fp16", "--precision=bf16"], "--precision=bf16 and --dtype=fp16 disagree", 2),
    (["--dataset=no_such_dataset"], "unknown dataset 'no_such_dataset'", 2),
    (["--dataset=mnist", "--data_dir={tmp}"], "'mnist' is not prepared in data_dir=", 2),
    (["--strategy=tpu"], "No TPU found at tpu='local'", 2),
    (["--model_dir={tmp}/file"], "--model_dir must be a directory", 1),
    (["--jit_compile", "--strategy=mirrored", "--num_cpu_devices=2"],
     "--jit_compile with MirroredStrategy over 2 replicas fails in Keras 3.15", 2),
    (["--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=7"],
     "--batch_size=7 is not divisible by the 2 replicas", 2),
    (["--dtype=fp16", "--initial_scale=0.5"],
     "--initial_scale: --initial_scale=0.5 is below --min_scale=1 (its default)", 2),
    (["--dtype=fp16", "--min_scale=65536"],
     "--min_scale: --initial_scale=32768 (its default) is below --min_scale=65536", 2),
    (["--min_scale=1e-40"], "--min_scale=1e-40 must be a positive number within float32's "
                            "normal range", 2),
    (["--learning_rate=nan"], "--learning_rate=nan must be a positive finite number", 2),
    (["--tpu=foo", "--strategy=one_device"],
     "--tpu=foo is only used with --strategy=tpu (or auto); got --strategy=one_device", 2),
    (["extra"], "unexpected positional arguments ['extra']", 2),
    (["--restart"], "--restart starts a --model_dir's run over; give --model_dir", 2),
    (["--float32_layers=dense_0,,logits"], "--float32_layers='dense_0,,logits': give 'auto' or "
                                           "layer names", 2),
    (["--float32_layers=dense_0,nope", "--epochs=1"],
     "--float32_layers: no layer of 'mlp' is named 'nope'; its layers: dense_0", 2),
    (["--weights_dtype=bf16"], "--weights_dtype='bf16' is not accepted: bfloat16 with "
                               "--precision=bf16 (mixed_bfloat16), float16 with --precision=fp16", 2),
    (["--weights_dtype=float16", "--precision=bf16"],
     "--weights_dtype=float16 does not fit the policy mixed_bfloat16 (it computes in bfloat16)", 2),
    (["--weights_dtype=bfloat16", "--dtype=fp32"],
     "--weights_dtype=bfloat16 does not fit the policy float32 (it computes in float32)", 2),
    (["--weights_dtype=bfloat16", "--precision=tune"],
     "--weights_dtype=bfloat16 with --precision=tune: tune chooses the weights' dtype too", 2),
]


@pytest.fixture(scope="module")
def bad_input_runs(child_runs):
    return child_runs["bad"]


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory):
    """Every run of this module that needs no process of its own, through the binary's entry
    point in one child process (TensorFlow imported once): training runs (no flag at all,
    four strategies, float16 with accumulation, a NaN stop) and the bad-input cases. Those with
    MirroredStrategy first: the CPU is split before anything initializes TensorFlow."""
    tmp = tmp_path_factory.mktemp("runs")
    (tmp / "file").write_text("not a directory")
    fits = [[*args, "--epochs=2", "--steps_per_epoch=20", f"--model_dir={tmp / str(i)}"]
            for i, (args, _, _, _) in enumerate(STRATEGY_CASES)]
    fits.append(["--strategy=multi_worker_mirrored", "--epochs=2", "--steps_per_epoch=20",
                 f"--model_dir={tmp / 'mwms'}"])  # single-worker: MWMS without TF_CONFIG
    fits.append(["--dtype=fp16", "--grad_accum_steps=2", "--remat", "--initial_scale=256",
                 "--growth_interval=5", "--epochs=2", "--steps_per_epoch=20",
                 "--float32_layers=auto", f"--model_dir={tmp / 'fp16'}"])
    fits.append(["--learning_rate=1e30", "--epochs=2", "--steps_per_epoch=20",
                 f"--model_dir={tmp / 'nan'}"])
    bad = [[a.format(tmp=tmp) for a in args] for args, _, _ in BAD_INPUT]
    bad += [{"argv": ["--epochs=1"], "env": {"TFMP_PRECISION": "fp17"}},
            {"argv": ["--dataset=imdb_reviews", "--model=cnn"], "mock_data": 16}]
    cases = [("fit", i, c) for i, c in enumerate(fits)] + [("bad", i, c) for i, c in enumerate(bad)]
    cases.append(("default", 0, []))
    cases.sort(key=lambda case: "--num_cpu_devices=2" not in str(case[2]))
    runs = helpers.run_tool_cases("train", [case for _, _, case in cases], stdout=True)
    results = {(kind, i): run if kind == "default" else run[:2]
               for (kind, i, _), run in zip(cases, runs)}
    n_fit, n_bad = len(fits), len(BAD_INPUT)
    fit = [results["fit", i] for i in range(n_fit)]
    return {"default": results["default", 0],
            "fit": (tmp, {"strategies": fit[:len(STRATEGY_CASES)], "mwms": fit[-3],
                          "fp16": fit[-2], "nan": fit[-1]}),
            "bad": {**{i: results["bad", i] for i in range(n_bad)},
                    "env": results["bad", n_bad], "tfds": results["bad", n_bad + 1]}}


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[" ".join(a) for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line(bad_input_runs, case):
    _, fragment, code = BAD_INPUT[case]
    returncode, stderr = bad_input_runs[case]
    assert returncode == code, stderr
    assert fragment in stderr
    assert "Traceback" not in stderr
    assert len([l for l in stderr.splitlines() if "error:" in l]) == 1


def test_each_case_of_the_shared_child_warns_as_a_process_of_its_own(bad_input_runs):
    # The float16 fit ran earlier in the same child and was told the trap; this case, refused
    # after its policy is set, is told again (tfmp says it once per process).
    _, stderr = bad_input_runs[1]
    assert "mixed_float16 on a CPU-only host is a trap" in stderr


def test_bad_tfmp_precision_in_the_environment_is_one_line(bad_input_runs):
    code, stderr = bad_input_runs["env"]  # run with the other bad-input cases
    assert code == 2 and "Traceback" not in stderr
    assert "environment variable TFMP_PRECISION='fp17': Unknown precision 'fp17'" in stderr


def test_tfds_dataset_of_the_wrong_kind_is_one_line(bad_input_runs):
    code, stderr = bad_input_runs["tfds"]  # the binary with tensorflow-datasets' mock data
    assert code == 2 and "Traceback" not in stderr
    assert "dataset 'imdb_reviews' has text" in stderr


def test_nan_stop_exits_1_and_keeps_the_backup(fit_runs):
    tmp, runs = fit_runs
    tmp_path = tmp / "nan"
    code, stderr = runs["nan"]
    assert code == 1 and "Traceback" not in stderr
    assert "training stopped on a NaN event (backup kept in" in stderr
    # Under the precision auto picks here (float32 or bfloat16): float32 diverges alike, so
    # neither float32 layers nor another precision is advised.
    line = [l for l in stderr.splitlines() if "training stopped on a NaN event" in l]
    assert len(line) == 1 and "nonfinite loss" in line[0] and "diagnosed as divergence" in line[0]
    assert "precision is not the cause" in line[0] and "lower the learning rate (now 1e+30)" in line[0]
    assert "float32_layers" not in line[0] and "switch to" not in line[0]
    s = summary(tmp_path)
    event = s["nan_events"][0]
    assert s["stopped_by_nan"] and (event["kind"], event["trigger"]) == ("divergence", "nonfinite_loss")
    assert not os.path.exists(os.path.join(tmp_path, "model.keras"))
    assert f"tfmp: writing {tmp_path / 'summary.json'}" in stderr
    assert "tfmp: evaluating" not in stderr and "model.keras" not in stderr


def test_sigkill_mid_epoch_then_resume(tmp_path):
    # The precision auto picks on this CPU: resuming is the point here, not bfloat16.
    args = ["--epochs=3", "--steps_per_epoch=80", "--batch_size=64", f"--model_dir={tmp_path}"]
    backup = os.path.join(tmp_path, "backup")
    helpers.kill_after_backup(["-m", "tools.train", *args], backup, env(),  # its own process
                              into_next=0.3)  # well inside the third epoch
    assert helpers.backup_epoch(backup) == 2
    assert not os.path.exists(os.path.join(tmp_path, "summary.json"))

    # What the backup holds: the weights file includes the optimizer's variables.
    from tfmp.app import data, training
    import models
    config = training.TrainConfig(batch_size=64)
    d = data.synthetic("vector", 64)
    keras.config.set_dtype_policy(_auto())
    model, opt = training._build_compiled(config, models.get("mlp")[0], d, _auto())
    opt.build(model.trainable_variables)
    model.load_weights(os.path.join(backup, "latest.weights.h5"))
    saved_step = int(opt.inner_optimizer._iterations.numpy()) + int(opt.skipped_steps.numpy())
    assert saved_step == 160

    again = train(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    s = summary(tmp_path)
    assert s["resumed_from_epoch"] == 2 and s["epochs_completed"] == [2]
    assert s["start_step"] == saved_step  # optimizer state restored, not restarted
    assert "epochs 3 of 3 (resumed after epoch 2)" in again.stdout
