"""tfmp.app.run_dir: moving a run's files aside never overwrites one moved before; what a
killed save leaves is recognized."""

import hashlib
import json
import logging
import os
import tempfile

import pytest

from tfmp.app import run_dir
from tfmp.atomic import atomic_path


def test_move_aside_never_overwrites_what_an_earlier_restart_moved(tmp_path):
    moved = []
    for content in (b"first", b"second", b"third"):  # within one second: the same stamp
        (tmp_path / "tune.json").write_bytes(content)
        moved.append(run_dir.move_aside(str(tmp_path / "tune.json")))
    assert len(set(moved)) == 3 and not (tmp_path / "tune.json").exists()
    assert [open(p, "rb").read() for p in moved] == [b"first", b"second", b"third"]
    assert all(os.path.basename(p).startswith("tune.json.") for p in moved)
    assert run_dir.move_aside(str(tmp_path / "tune.json")) is None  # nothing there


def test_restart_moves_the_backup_and_tune_json_and_nothing_else(tmp_path):
    for name in ("backup/latest.weights.h5", "tune.json", "summary.json", "model.keras"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    moved = run_dir.restart(str(tmp_path))
    assert [os.path.basename(old) for old, _ in moved] == ["backup", "tune.json"]
    assert sorted(p for p in os.listdir(tmp_path) if "." not in p or p.endswith((".json", ".keras"))
                  ) == ["model.keras", "summary.json"]
    assert (tmp_path / os.path.basename(moved[0][1]) / "latest.weights.h5").read_text() \
        == "backup/latest.weights.h5"


def _backup(tmp_path, *names):
    """A backup directory holding `names` (the previous pair complete: metadata with the
    size and SHA-256 of its weights, as SafeBackupAndRestore writes it)."""
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in names:
        (backup / name).write_bytes(f"weights of {name}".encode())
    if "training_metadata.json.bkp" in names:
        weights = (backup / "latest.weights.h5.bkp").read_bytes()
        (backup / "training_metadata.json.bkp").write_text(json.dumps(
            {"epoch": 1, "batch": -1, "weights_bytes": len(weights),
             "weights_sha256": hashlib.sha256(weights).hexdigest()}))
    return backup


def test_the_lone_weights_of_an_interrupted_first_save_are_moved_aside(tmp_path, caplog):
    backup = _backup(tmp_path, "latest.weights.h5")
    caplog.set_level(logging.WARNING)
    assert run_dir.checked_backup(str(backup)) is None  # nothing to resume: train from the start
    (moved,) = [p for p in os.listdir(tmp_path) if p.startswith("backup.")]
    assert not backup.exists()
    assert (tmp_path / moved / "latest.weights.h5").read_bytes() == b"weights of latest.weights.h5"
    (line,) = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert "only latest.weights.h5, of a first save interrupted" in line and moved in line


def test_a_worker_that_does_not_own_the_backup_leaves_it_to_its_owner(tmp_path):
    backup = _backup(tmp_path, "latest.weights.h5")
    assert run_dir.checked_backup(str(backup), owner=False) is None
    assert os.listdir(tmp_path) == ["backup"] and os.listdir(backup) == ["latest.weights.h5"]


def test_lone_latest_weights_beside_a_previous_copy_are_no_interrupted_first_save(tmp_path):
    backup = _backup(tmp_path, "latest.weights.h5", "latest.weights.h5.bkp",
                     "training_metadata.json.bkp")
    checkpoint = run_dir.checked_backup(str(backup))  # the previous copy, as before
    assert (checkpoint.epoch, checkpoint.previous) == (1, True)
    os.remove(backup / "training_metadata.json.bkp")  # a damaged previous copy: not resumable
    with pytest.raises(run_dir.RunDirError, match="training_metadata.json is missing; previous"):
        run_dir.checked_backup(str(backup))
    assert sorted(os.listdir(tmp_path)) == ["backup"]  # nothing moved


def test_what_killed_saves_left_is_removed_and_nothing_else(tmp_path, caplog):
    backup = _backup(tmp_path, "latest.weights.h5")
    writers, temporaries = [], []  # each stopped inside atomic_path, as if killed mid-write
    for target, suffix in (("model.keras", ".keras"), ("summary.json", ".json"),
                           ("tune.json", ".json"), ("backup/latest.weights.h5", ".weights.h5"),
                           ("backup/training_metadata.json", ".json")):
        writers.append(atomic_path(str(tmp_path / target), suffix))
        temporaries.append(writers[-1].__enter__())
        with open(temporaries[-1], "w") as f:
            f.write("half a file")
    _, unnamed = tempfile.mkstemp(suffix=".weights.h5", dir=backup)  # as tfmp wrote before
    kept = ["model.keras", "notes.txt", "tmpabcd1234.keras", ".model.keras.tmp-notes",
            ".model_float16.tflite.tmp-abcd1234.tflite"]  # a user's, or another writer's
    for name in kept:
        (tmp_path / name).write_text(name)
    expected = sorted(temporaries[:3]) + sorted([*temporaries[3:], unnamed])
    assert run_dir.leftovers(str(tmp_path)) == expected
    caplog.set_level(logging.WARNING)
    assert run_dir.remove_leftovers(str(tmp_path)) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(["backup", *kept])
    assert os.listdir(backup) == ["latest.weights.h5"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"removed 6 temporary file(s) that interrupted saves left in {tmp_path}")
    assert run_dir.remove_leftovers(str(tmp_path / "none")) == []  # a new run directory


def test_missing_folders_are_the_ones_makedirs_would_make(tmp_path):
    from tfmp.atomic import missing_folders
    target = tmp_path / "a" / "b"
    assert missing_folders(str(target)) == [str(target), str(tmp_path / "a"), str(tmp_path)]
    (tmp_path / "file").write_text("")
    assert missing_folders(str(tmp_path / "file" / "x")) == [str(tmp_path / "file" / "x"),
                                                              str(tmp_path / "file")]
    assert missing_folders(str(tmp_path)) == [str(tmp_path)]
