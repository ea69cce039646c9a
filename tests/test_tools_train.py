"""tools/train.py end to end, in subprocesses (the README's main job)."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

import tfmp  # noqa: F401  (registers tfmp's layers and optimizer for load_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def train(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools.train", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return json.load(f)


def test_default_run_no_flags():
    start = time.time()
    proc = train()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.time() - start < 60
    out = proc.stdout
    assert "=== tfmp training summary ===" in out and "model mlp on synthetic" in out
    accuracy = float(out.split("eval_accuracy=")[1].split(",")[0])
    assert accuracy > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("args, strategy, replicas", [
    (["--strategy=default"], "_DefaultDistributionStrategy", 1),
    (["--strategy=one_device"], "OneDeviceStrategy", 1),
    (["--distribution_strategy=mirrored", "--num_cpu_devices=2"], "MirroredStrategy", 2),
    (["--strategy=multi_worker_mirrored"], "CollectiveAllReduceStrategy", 1),  # MWMS class
])
def test_strategies(tmp_path, args, strategy, replicas):
    proc = train(*args, "--epochs=2", "--steps_per_epoch=20", f"--model_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary(tmp_path)
    assert (s["strategy"], s["replicas"]) == (strategy, replicas)
    assert s["final_train_metrics"]["loss"] < 2.3  # below chance-level cross-entropy


def test_fp16_accumulation_remat_and_model_garden_flags(tmp_path):
    proc = train("--dtype=fp16", "--grad_accum_steps=2", "--remat", "--initial_scale=256",
                 "--growth_interval=5", "--epochs=2", "--steps_per_epoch=20",
                 f"--model_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary(tmp_path)
    assert s["policy"] == "mixed_float16" and s["policy_source"] == "explicit"
    assert s["flags"]["grad_accum_steps"] == 2 and s["flags"]["remat"] is True
    assert s["loss_scale"]["loss_scale_start"] == 256.0
    assert s["loss_scale"]["loss_scale_end"] > 256.0  # grew every 5 clean steps
    model = keras.models.load_model(os.path.join(tmp_path, "model.keras"))
    assert model.optimizer.growth_interval == 5


@pytest.mark.parametrize("args, fragment, code", [
    (["--precision=fp8"], "flag --precision=fp8: value should be one of", 1),
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
])
def test_bad_input_is_one_line(tmp_path, args, fragment, code):
    (tmp_path / "file").write_text("not a directory")
    proc = train(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == code
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def _metadata_epoch(backup):
    try:
        with open(os.path.join(backup, "training_metadata.json")) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):
        return 0


def test_sigkill_mid_epoch_then_resume(tmp_path):
    args = ["--dtype=fp16", "--initial_scale=1024", "--growth_interval=50", "--epochs=5",
            "--steps_per_epoch=300", "--batch_size=64", f"--model_dir={tmp_path}"]
    backup = os.path.join(tmp_path, "backup")
    proc = subprocess.Popen([sys.executable, "-m", "tools.train", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = {}
        deadline = time.time() + 240
        while _metadata_epoch(backup) < 2 and time.time() < deadline and proc.poll() is None:
            seen.setdefault(_metadata_epoch(backup), time.time())
            time.sleep(0.01)
        assert _metadata_epoch(backup) == 2, "the run never completed two epochs"
        epoch_seconds = time.time() - seen.get(1, time.time() - 1.0)
        time.sleep(0.3 * epoch_seconds)  # well inside the third epoch
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert _metadata_epoch(backup) == 2
    assert not os.path.exists(os.path.join(tmp_path, "summary.json"))

    # What the backup holds: the weights file includes the optimizer's variables.
    from tfmp import data, training
    import models
    config = training.TrainConfig(precision="fp16", batch_size=64)
    d = data.synthetic("vector", 64)
    model, opt = training._build_compiled(config, models.get("mlp")[0], d, "mixed_float16")
    opt.build(model.trainable_variables)
    model.load_weights(os.path.join(backup, "latest.weights.h5"))
    saved_scale = float(opt.dynamic_scale.numpy())
    saved_step = int(opt.inner_optimizer._iterations.numpy()) + int(opt.skipped_steps.numpy())
    assert saved_step == 600

    again = train(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    s = summary(tmp_path)
    assert s["resumed_from_epoch"] == 2 and s["epochs_completed"] == [2, 3, 4]
    assert s["start_step"] == saved_step
    assert s["loss_scale"]["loss_scale_start"] == saved_scale > 1024.0
    assert "epochs 3-5 of 5 (resumed after epoch 2)" in again.stdout
