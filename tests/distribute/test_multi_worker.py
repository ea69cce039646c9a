"""Multi-worker training: real worker processes on 127.0.0.1, each bounded in time."""

import io
import json
import os
import socket
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import helpers
from tfmp import _compat, distribute
from tfmp.scaling.half_weights import SEVERAL_WORKERS

JOB = os.path.join(helpers.ROOT, "tests", "distribute", "multi_worker_job.py")


def _start_cluster(argv, **env):
    """`python *argv` as the two workers of a cluster on 127.0.0.1, each with its TF_CONFIG and
    each a process forked from this worker's zygote (TensorFlow imported once, not once per
    worker): what `launch` starts, for the runs that are not about the launcher (the
    launcher itself: the launch test and the `launch_local` run below). `env`: more
    environment variables for both. Not waited for."""
    ports = distribute.launcher.free_ports(2)
    return [helpers.zygote().start(argv, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env,
                                                  TF_CONFIG=distribute.launcher.tf_config(ports, i)))
            for i in (0, 1)]


def test_launch_gives_each_worker_its_tf_config_and_prefixes_its_lines():
    code = ("import json, os; config = json.loads(os.environ['TF_CONFIG']); "
            "print('task', config['task']['index'], 'of', len(config['cluster']['worker']))")
    out = io.StringIO()
    assert distribute.launch([sys.executable, "-c", code], 2, out=out, stop_grace=0.5) == 0
    assert sorted(out.getvalue().splitlines()) == ["[worker 0] task 0 of 2",
                                                   "[worker 1] task 1 of 2"]


FP16_INJECT, BF16_ACCUM, NO_FIX = "fp16+inject", "bf16+accum", "bf16+nofix"
BF16_WEIGHTS = "bf16+weights"


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory):
    """One two-worker cluster trains the scenarios in turn (TensorFlow and the cluster
    started once), the one without tfmp's fix last; one process trains the accumulation
    scenario alongside on the same global batches."""
    tmp = tmp_path_factory.mktemp("two_workers")
    single = tmp / "single"
    single.mkdir()
    alongside = helpers.zygote().start(  # `python JOB ...`, forked from this worker's zygote
        [JOB, str(single), "single", BF16_ACCUM],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    cluster = _start_cluster([JOB, str(tmp), FP16_INJECT, BF16_ACCUM,
                              BF16_WEIGHTS, NO_FIX])
    workers = [worker.wait(timeout=300) for worker in cluster]
    single_run = alongside.wait(timeout=150)
    code = next((worker.returncode for worker in workers if worker.returncode), 0)
    out = "".join(f"--- worker {i}\n{w.stdout}{w.stderr}" for i, w in enumerate(workers))
    return tmp, code, out, single_run.returncode, single_run.stderr + single_run.stdout


def _workers(tmp, scenario):
    return [json.loads((tmp / scenario / f"worker{i}.json").read_text()) for i in (0, 1)]


def test_fp16_overflow_on_one_worker_is_skipped_by_both(two_worker_runs):
    tmp, code, out, _, _ = two_worker_runs
    assert code == 0, out[-3000:]
    w0, w1 = _workers(tmp, FP16_INJECT)
    assert w0["skipped_steps"] == w1["skipped_steps"] == 1  # worker 0's gradients were clean
    assert w0["loss_scale"] == w1["loss_scale"] == 2.0**14  # one backoff from 2^15, on both
    assert w0["weights"] == w1["weights"]  # bit-identical (JSON of the float32 values)
    assert w0["loss"] == w1["loss"] and w0["loss"][-1] < w0["loss"][0]


def test_two_workers_cannot_hold_bfloat16_variables_in_this_tensorflow(two_worker_runs):
    # TensorFlow 2.21 broadcasts a new variable's initial value from the chief with
    # CollectiveBcastSend/Recv, which take no bfloat16: 16-bit weights (tfmp.compensate) cannot
    # train on several workers. Stock Keras' "bfloat16" policy fails the same way. When a
    # TensorFlow release lifts this, this test fails: then test compensated training there.
    tmp, code, out, _, _ = two_worker_runs
    assert code == 0, out[-3000:]
    for worker in _workers(tmp, BF16_WEIGHTS):
        assert "[Op:CollectiveBcast" in worker["error"] and "of bfloat16 is not" in worker["error"]
        # prepare(weights_dtype=...) says so in one line, before it changes anything
        assert worker["prepare"] == ("ValueError: weights_dtype='bfloat16' on several workers: "
                                     + SEVERAL_WORKERS)


def test_with_the_fix_off_keras_fails_as_upstream(two_worker_runs):
    tmp, code, out, _, _ = two_worker_runs
    assert code == 0, out[-3000:]
    for worker in _workers(tmp, NO_FIX):  # keras-team/keras#20585, on every worker
        assert worker["error"] and "Attempt to convert a value (PerReplica" in worker["error"]


def test_the_probe_sees_the_installed_keras_failure_and_nothing_changes_outside_a_cluster():
    assert _compat.keras_reduces_scalar_logs_along_axis_0() is True  # Keras 3.15
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert distribute.enable_multi_worker_fit(model, tf.distribute.get_strategy()) == []
    assert "_maybe_symbolic_build" not in vars(model)


@pytest.mark.parametrize("value, fragment", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
     "TF_CONFIG task index 1 is outside the cluster: 1 worker task(s), so 0..0"),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "worker", "index": 0}}',
     'TF_CONFIG needs "cluster": {"worker"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator"}}',
     'TF_CONFIG needs "task": {"type": "worker"'),
])
def test_bad_tf_config_is_one_line(value, fragment, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(ValueError, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("{", r"\{").replace("[", r"\[")):
        distribute.cluster.read_tf_config()


def test_cluster_roles(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", distribute.launcher.tf_config([5000, 5001], 1))
    two = distribute.cluster.read_tf_config()
    assert (two.num_workers, two.address, two.name) == (2, "127.0.0.1:5001", "worker:1")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["c:1"], "worker": ["a:2", "b:3"]},
                                                "task": {"type": "worker", "index": 1}}))
    chief_first = distribute.cluster.read_tf_config()
    assert (chief_first.addresses, chief_first.address, chief_first.num_workers) == (
        ("c:1", "a:2", "b:3"), "b:3", 3)
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.cluster.read_tf_config() is None
    assert distribute.launcher.describe_exit(-9) == "signal SIGKILL" and distribute.launcher.describe_exit(2) == "exit code 2"


def test_binary_bad_cluster_input_is_one_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    mw = ["--strategy=multi_worker_mirrored", "--epochs=1"]
    cases = [
        {"argv": mw, "env": {"TF_CONFIG": "{not json"}},
        {"argv": mw, "env": {"TF_CONFIG": distribute.launcher.tf_config([1, 2], 0).replace('"index": 0',
                                                                             '"index": 5')}},
        {"argv": [*mw, "--precision=tune"], "env": {"TF_CONFIG": distribute.launcher.tf_config([1, 2], 1)}},
        {"argv": [*mw, "--precision=bf16", "--weights_dtype=bfloat16"],
         "env": {"TF_CONFIG": distribute.launcher.tf_config([1, 2], 1)}},
        {"argv": mw, "env": {"TF_CONFIG": distribute.launcher.tf_config([port, port + 1], 0)}},  # in use
    ]
    runs = helpers.run_tool_cases("train", cases)
    busy.close()
    for (code, stderr), fragment in zip(runs, [
            "TF_CONFIG is not valid JSON", "TF_CONFIG task index 5 is outside the cluster",
            "--precision=tune measures on one process",
            "--weights_dtype=bfloat16 with 2 workers: TensorFlow's MultiWorkerMirroredStrategy "
            "cannot create bfloat16 variables",
            f"worker:0 cannot listen on 127.0.0.1:{port}: the port is in use"]):
        assert code == 2 and "Traceback" not in stderr, stderr
        assert fragment in stderr, stderr


def test_a_worker_that_cannot_reach_the_others_gives_up_after_the_timeout():
    start = time.monotonic()
    proc = helpers.run_tool("train", "--strategy=multi_worker_mirrored", "--cluster_timeout=2",
                            TF_CONFIG=distribute.launcher.tf_config(distribute.launcher.free_ports(2), 0), timeout=120)
    # Exit 2 as every bad input, though TensorFlow's wait holds the interpreter and ignores
    # SIGTERM (the watchdog's SIGINT meets the C library's _exit, not a Python handler).
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [proc.stderr.splitlines()[-1]] and "Traceback" not in proc.stderr
    assert errors[0].startswith("train.py: error: worker:0 could not reach the other workers of "
                                "the 2-worker cluster (127.0.0.1:")
    assert errors[0].endswith(") within 2 s")
    assert time.monotonic() - start < 60


def test_bf16_accumulation_on_two_workers_matches_one_process_on_the_same_batches(
        two_worker_runs):
    tmp, code, out, single_code, single_out = two_worker_runs
    assert code == 0, out[-3000:]
    assert single_code == 0, single_out[-3000:]
    w0, w1 = _workers(tmp, BF16_ACCUM)
    one = json.loads((tmp / "single" / BF16_ACCUM / "worker0.json").read_text())
    assert w0["weights"] == w1["weights"] and w0["skipped_steps"] == 0
    assert w0["iterations"] == one["iterations"] == 6  # 12 micro-batches, 2 per update
    for a, b in zip(w0["weights"], one["weights"]):  # bfloat16 sums in another order: 1e-4
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(w0["loss"], one["loss"], rtol=1e-4)


TRAIN_FLAGS = ["--strategy=multi_worker_mirrored", "--epochs=2",  # precision: auto on this CPU
               "--steps_per_epoch=20", "--batch_size=64",
               # the user's data function (tests/tools/userpkg), in an order a resume replays
               "--data=userpkg.feed:make_resumable"]
USERPKG = os.path.join(helpers.ROOT, "tests", "tools")


def _user_env(shards):
    """userpkg importable; each worker's data function records its input context in `shards`."""
    shards.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (USERPKG, os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "USERPKG_SHARDS": str(shards)}


def _launch_train(model_dir, **env):
    """`python -m tools.launch_local ... -- <TRAIN_FLAGS>`, the binary, in a process forked
    from this worker's zygote (its workers: fresh processes with this environment, `env`
    added, as `launch` starts them). Not waited for."""
    return helpers.zygote().start(
        ["-m", "tools.launch_local", "--num_workers=2", "--stop_grace=0.5", "--",
         *TRAIN_FLAGS, f"--model_dir={model_dir}"],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env))


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _each_worker_got_its_input_context(shards):
    """Each worker called the data function with its own input context: its own shard,
    batched per replica (64 / 2 workers)."""
    records = {p.name: json.loads(p.read_text()) for p in shards.iterdir()}
    assert sorted(records) == ["0.json", "1.json"]
    assert all(r["pipelines"] == 2 and r["batch"] == 32 for r in records.values())
    assert records["0.json"]["first_x"] != records["1.json"]["first_x"]


def test_sigkill_one_worker_then_relaunch_resumes_to_the_uninterrupted_result(tmp_path):
    """On the user's data function (`userpkg.feed:make_resumable`, sharded by each worker's
    input context): each worker gets its own context, and a relaunch after worker 1 is
    killed mid-second-epoch ends with the uninterrupted run's weights, bit for bit."""
    full = tmp_path / "uninterrupted"
    train = ["-m", "tools.train", *TRAIN_FLAGS]
    uninterrupted = _start_cluster([*train, f"--model_dir={full}"],  # never killed, alongside
                                   **_user_env(tmp_path / "shards_uninterrupted"))
    tmp_path, shards = tmp_path / "killed", tmp_path / "shards_killed"
    launcher, launched = _launch_train(tmp_path, **_user_env(shards)), None
    try:
        deadline = time.monotonic() + 90
        while (helpers.backup_epoch(tmp_path / "backup") < 1 and launcher.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert helpers.backup_epoch(tmp_path / "backup") == 1, "never completed an epoch"
        assert launcher.poll() is None, "finished before it could be killed"
        os.kill(_children(launcher.pid)[1], 9)  # worker 1, inside the second epoch
        launched = launcher.wait(timeout=60)  # killed past the timeout
    finally:
        if launched is None and launcher.poll() is None:  # a check above failed: not left running
            os.kill(launcher.pid, 9)
    out = launched.stdout + launched.stderr
    assert launched.returncode == 1, out[-3000:]
    assert "launch_local: worker 1 failed (signal SIGKILL); stopping the others" in out
    assert "[worker 0] " in out and "[worker 1] " in out  # the binary's launcher prefixed them
    assert not (tmp_path / "model.keras").exists()
    # The reference run ends before the relaunch starts: six TensorFlow processes at once on
    # two cores once starved a worker past the coordination service's heartbeat timeout.
    straight_runs = [worker.wait(timeout=120) for worker in uninterrupted]

    _each_worker_got_its_input_context(shards)  # the launched, fresh processes
    for record in shards.iterdir():
        record.unlink()  # the relaunch records its own
    relaunch = _start_cluster([*train, f"--model_dir={tmp_path}"],  # on the killed run's dir
                              **_user_env(shards))
    for worker in [worker.wait(timeout=120) for worker in relaunch]:
        assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
        assert "epochs 2 of 2 (resumed after epoch 1)" in worker.stdout + worker.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["cluster"]["workers"] == 2
    assert np.isfinite(summary["final_train_metrics"]["loss"])
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "summary.json", "tensorboard"]
    _each_worker_got_its_input_context(shards)
    for worker in straight_runs:
        assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
    _each_worker_got_its_input_context(full.parent / "shards_uninterrupted")
    import keras

    import tfmp  # noqa: F401  (registers tfmp's classes for load_model)

    resumed = keras.models.load_model(tmp_path / "model.keras").get_weights()
    straight = keras.models.load_model(full / "model.keras").get_weights()
    for a, b in zip(resumed, straight):  # same batches, same state: the same final weights
        np.testing.assert_array_equal(a, b)
