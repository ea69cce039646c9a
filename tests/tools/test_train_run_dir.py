"""tools/train on a damaged --model_dir, through the binary: one line and exit 2, or the
documented recovery; what the directory held before is never lost."""

import json
import os
import shutil

import keras
import pytest
import tensorflow as tf

import helpers
import models
import tfmp
from tfmp.app import data, run_dir, training
from tfmp.callbacks import SafeBackupAndRestore

ARGS = ["--epochs=3", "--steps_per_epoch=5", "--batch_size=64"]
EARLIER = {"model.keras": b"the model of an earlier run", "summary.json": b'{"earlier": 1}',
           "tensorboard/events.out": b"earlier logs"}
BACKUP = "backup"
LATEST_W, LATEST_M = "latest.weights.h5", "training_metadata.json"
PREV_W, PREV_M = LATEST_W + ".bkp", LATEST_M + ".bkp"
# What saves killed mid-write leave (atomic_path's hidden names; tfmp's earlier unhidden one),
# in the order they are found: the run directory's, then the backup's, by name.
LEFTOVERS = (".summary.json.tmp-abcd1234.json", "backup/.latest.weights.h5.tmp-x_9z8y7w.weights.h5",
             "backup/tmpabcd1234.weights.h5")


def _tree(directory):
    return {os.path.relpath(os.path.join(root, f), directory): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(directory) for f in files}


def _two_epoch_backup(directory):
    """The backup tools/train leaves after 2 of its epochs (same model, data and policy)."""
    policy = tfmp.detect_hardware().recommended_policy  # what auto picks on this CPU
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(policy)
        d = data.synthetic("vector", 64)
        model, _ = training._build_compiled(training.TrainConfig(batch_size=64),
                                            models.get("mlp")[0], d, policy)
        model.fit(d.train, epochs=2, steps_per_epoch=5, verbose=0, callbacks=[
            SafeBackupAndRestore(str(directory / BACKUP), delete_checkpoint=False)])
    finally:
        keras.config.set_dtype_policy(previous)


def _damage(run, kind):
    backup = run / BACKUP
    if kind == "all truncated":
        for name in os.listdir(backup):
            helpers.truncate(backup / name)
    elif kind == "latest truncated":
        helpers.truncate(backup / LATEST_W)
    elif kind == "a file missing":
        (backup / LATEST_W).unlink()
    elif kind == "interrupted first save":  # killed between the weights' rename and the metadata
        for name in (LATEST_M, PREV_W, PREV_M):
            (backup / name).unlink()
    elif kind == "tune truncated":
        (run / "tune.json").write_text('{"policy": "mixed_bf')
    elif kind == "tune garbage":
        (run / "tune.json").write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "tune not an object":
        (run / "tune.json").write_text("[1]")
    elif kind == "tune unknown policy":
        (run / "tune.json").write_text('{"policy": "float64", "reason": "edited by hand"}')
    elif kind == "tune xla not a bool":
        (run / "tune.json").write_text('{"policy": "float32", "reason": "r", "jit_compile": 1}')
    elif kind == "tune unknown weights":
        (run / "tune.json").write_text('{"policy": "mixed_bfloat16", "reason": "r", '
                                       '"weights_dtype": "int8"}')


# (damage, extra flags, exit code, what stderr says)
CASES = {
    "all truncated": ([], 2, "backup is damaged: training_metadata.json is unreadable"),
    "tune truncated": (["--precision=tune"], 2, "tune.json is damaged (JSONDecodeError"),
    "tune garbage": (["--precision=tune"], 2, "tune.json is damaged (UnicodeDecodeError"),
    "tune not an object": (["--precision=tune"], 2, "tune.json is damaged (a JSON list, not"),
    "tune unknown policy": (["--precision=tune"], 2,
                            "tune.json is damaged (policy='float64', expected one of"),
    "tune xla not a bool": (["--precision=tune"], 2,
                            "tune.json is damaged (jit_compile=1, expected true or false)"),
    "tune unknown weights": (["--precision=tune"], 2, "tune.json is damaged (weights_dtype="
                             "'int8', expected null, \"bfloat16\" or \"float16\")"),
    "latest truncated": ([], 0, "Restoring the previous checkpoint"),
    "a file missing": ([], 0, "Restoring the previous checkpoint"),
    "interrupted first save": ([], 0, "holds only latest.weights.h5, of a first save interrupted"),
    "restart": (["--restart"], 0, "--restart: moved"),
    # the same reference at other widths: its layers' shapes differ (no other data to make)
    "another model": (["--model_args=hidden=[16]"], 2,
                      "(epoch 2) does not fit this model (ValueError: "),
    "another accumulation": (["--grad_accum_steps=2"], 2,
                             "(epoch 2) was made with --grad_accum_steps=1, not 2: its optimizer"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dirs")
    _two_epoch_backup(root / "good")
    dirs, before = {}, {}
    for name in (*CASES, "disk full", "disk full at the end"):
        run = root / name.replace(" ", "_")
        shutil.copytree(root / "good", run)
        for path, content in EARLIER.items():
            (run / path).parent.mkdir(exist_ok=True)
            (run / path).write_bytes(content)
        _damage(run, "all truncated" if name == "restart" else name)
        if name == "restart":
            (run / "tune.json").write_text("{")
        if name == "latest truncated":
            for path in LEFTOVERS:
                (run / path).write_bytes(b"half a file")
        dirs[name], before[name] = run, _tree(run)
    cases = [[*ARGS, *flags, f"--model_dir={dirs[name]}"] for name, (flags, _, _) in CASES.items()]
    # The next backup (epoch 3) cannot be written: a file-size limit half its size.
    limit = (dirs["disk full"] / BACKUP / LATEST_W).stat().st_size // 2
    cases.append({"argv": ["--epochs=4", *ARGS[1:], f"--model_dir={dirs['disk full']}"],
                  "file_size_limit": limit})
    # Room for the backup (epoch 3), not for model.keras (the same weights and the config).
    limit = (dirs["disk full at the end"] / BACKUP / LATEST_W).stat().st_size + 1024
    cases.append({"argv": [*ARGS, f"--model_dir={dirs['disk full at the end']}"],
                  "file_size_limit": limit})
    results = helpers.run_tool_cases("train", cases)
    return dirs, before, dict(zip([*CASES, "disk full", "disk full at the end"], results))


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] == 2])
def test_a_damaged_file_is_one_line_and_exit_2_with_everything_left_as_it_was(runs, case):
    dirs, before, results = runs
    code, stderr = results[case]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and CASES[case][2] in errors[0], stderr[-2000:]
    assert "--restart moves it aside" in errors[0]
    after = _tree(dirs[case])  # nothing moved, rewritten or deleted (a new TensorBoard log aside)
    assert {k: v for k, v in after.items() if k in before[case]} == before[case]
    assert all(k.startswith("tensorboard/train/") for k in set(after) - set(before[case]))


@pytest.mark.parametrize("case", ["latest truncated", "a file missing"])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(runs, case):
    dirs, _, results = runs
    code, stderr = results[case]
    assert code == 0, stderr[-2000:]
    assert CASES[case][2] in stderr and "(epoch 1)" in stderr
    summary = json.loads((dirs[case] / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_completed"] == [1, 2]


def test_what_killed_saves_left_is_removed_at_the_next_start(runs):
    dirs, _, results = runs
    _, stderr = results["latest truncated"]
    assert f"removed 3 temporary file(s) that interrupted saves left in {dirs['latest truncated']}: " \
        f"{', '.join(LEFTOVERS)}" in stderr  # (listed in the order they are found)
    assert not any((dirs["latest truncated"] / path).exists() for path in LEFTOVERS)


def test_restart_moves_the_damaged_backup_and_tune_json_aside_and_starts_over(runs):
    dirs, before, results = runs
    run = dirs["restart"]
    code, stderr = results["restart"]
    assert code == 0, stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_epoch"] is None and summary["epochs_completed"] == [0, 1, 2]
    assert stderr.count("--restart: moved") == 2
    _assert_moved_aside(run, before["restart"], BACKUP, "tune.json")


def _assert_moved_aside(run, before, *names):
    """Each of `names` is in `run` once under a dated name, byte for byte what was there."""
    aside = {name: [p for p in os.listdir(run) if p.startswith(name + ".")] for name in names}
    assert all(len(v) == 1 for v in aside.values()), os.listdir(run)
    for name, (moved,) in aside.items():
        if name == BACKUP:
            assert _tree(run / moved) == {k[len(BACKUP) + 1:]: v for k, v in before.items()
                                          if k.startswith(BACKUP + "/")}
        else:
            assert (run / moved).read_bytes() == before[name]


def test_the_lone_weights_of_an_interrupted_first_save_are_moved_aside_and_training_starts(runs):
    dirs, before, results = runs
    run = dirs["interrupted first save"]
    code, stderr = results["interrupted first save"]
    assert code == 0, stderr[-2000:]
    assert stderr.count(CASES["interrupted first save"][2]) == 1  # one line says so
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_epoch"] is None and summary["epochs_completed"] == [0, 1, 2]
    _assert_moved_aside(run, before["interrupted first save"], BACKUP)


def _one_error_line(results, case, fragment):
    code, stderr = results[case]
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], stderr[-2000:]


def test_a_write_that_fails_half_way_keeps_the_last_complete_backup(runs):
    dirs, before, results = runs
    run = dirs["disk full"]
    _one_error_line(results, "disk full", "File too large; what")
    after = _tree(run)
    for path, content in before["disk full"].items():  # the backup and every earlier file
        assert after[path] == content, path
    assert not run_dir.leftovers(str(run))  # no half file left
    # The next run resumes from the last complete backup (the library here: no new process).
    policy = tfmp.detect_hardware().recommended_policy
    config = training.TrainConfig(batch_size=64, epochs=4, steps_per_epoch=5, model_dir=str(run))
    summary = training.train(config, models.get("mlp")[0], data.synthetic("vector", 64),
                             tf.distribute.get_strategy())
    assert summary["policy"] == policy
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_completed"] == [2, 3]


def test_a_final_write_that_fails_keeps_the_backup_and_the_earlier_files(runs):
    dirs, before, results = runs
    run = dirs["disk full at the end"]
    _one_error_line(results, "disk full at the end", "model.keras: File too large")
    for path in EARLIER:  # model.keras and summary.json of the earlier run, as they were
        assert (run / path).read_bytes() == before["disk full at the end"][path], path
    checkpoint = tfmp.callbacks.inspect_backup(str(run / BACKUP))
    assert checkpoint.epoch == 3 and not checkpoint.previous  # the backup was not deleted
