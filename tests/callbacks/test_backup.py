"""SafeBackupAndRestore in real model.fit runs: saves that survive a failed write, restores
that check what they read."""

import json
import logging as py_logging
import os
import resource
import shutil
import warnings

import keras
import numpy as np
import pytest

from helpers import truncate
from tfmp import _compat
from tfmp.callbacks import BackupError, SafeBackupAndRestore, inspect_backup
from tfmp.callbacks import backup as backup_module

X, Y = np.random.default_rng(0).random((32, 4)), np.random.default_rng(1).random((32, 1))
LATEST_W, LATEST_M = "latest.weights.h5", "training_metadata.json"
PREV_W, PREV_M = LATEST_W + ".bkp", LATEST_M + ".bkp"


def _model(units=3, optimizer=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units), keras.layers.Dense(1)])
    # Eager steps: the callback is the point, and tracing a step would cost more than the test.
    model.compile(optimizer or keras.optimizers.Adam(0.01), "mse", run_eagerly=True)
    return model


def _fit(backup_dir, epochs, model=None, **kwargs):
    model = model or _model()
    callback = SafeBackupAndRestore(str(backup_dir), delete_checkpoint=False, **kwargs)
    history = model.fit(X, Y, epochs=epochs, batch_size=8, verbose=0, callbacks=[callback])
    return model, history, callback


def _bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A backup after 2 epochs (the previous copy: epoch 1), and the model's weights then."""
    directory = tmp_path_factory.mktemp("backup") / "b"
    model, _, _ = _fit(directory, 2)
    return directory, [w.numpy() for w in model.weights + model.optimizer.variables]


def _copy(two_epochs, tmp_path):
    directory, _ = two_epochs
    shutil.copytree(directory, tmp_path / "b")
    return tmp_path / "b"


def test_each_save_keeps_the_last_complete_checkpoint_as_the_previous_one(two_epochs):
    directory, _ = two_epochs
    latest, previous = (json.loads((directory / m).read_text()) for m in (LATEST_M, PREV_M))
    assert (latest["epoch"], previous["epoch"]) == (2, 1)
    for meta, weights in ((latest, LATEST_W), (previous, PREV_W)):
        assert meta["weights_bytes"] == (directory / weights).stat().st_size
    assert latest["weights_sha256"] != previous["weights_sha256"]  # two different states
    assert latest["gradient_accumulation_steps"] == 1
    assert inspect_backup(str(directory)).epoch == 2


def test_keras_arguments_in_keras_order_and_tfmps_by_keyword_only(tmp_path):
    callback = SafeBackupAndRestore(str(tmp_path), 2, False, False)  # Keras' positional order
    assert (callback.save_freq, callback.double_checkpoint, callback.delete_checkpoint) == (
        2, False, False)
    assert SafeBackupAndRestore(str(tmp_path)).double_checkpoint  # tfmp's default: two copies
    with pytest.raises(TypeError):
        SafeBackupAndRestore(str(tmp_path), "epoch", True, True, str(tmp_path))
    with pytest.raises(ValueError, match="double_checkpoint='yes'"):
        SafeBackupAndRestore(str(tmp_path), double_checkpoint="yes")


def _fail_the_metadata_of_epoch_3(directory, model, callback, monkeypatch):
    """Trains on to epoch 3, whose save fails writing the metadata (the disk is full): a
    restore must then take the checkpoint of epoch 2, the previous copy."""

    def full_disk(path, payload):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(backup_module, "write_json_atomically", full_disk)
    with pytest.raises(OSError):
        model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    checkpoint = inspect_backup(str(directory))
    assert (checkpoint.epoch, checkpoint.previous) == (2, True), checkpoint


def test_double_checkpoint_false_keeps_the_previous_copy_only_while_saving(tmp_path, monkeypatch):
    # As Keras' default, one checkpoint on disk; but a save cut short between the new weights
    # and their metadata still leaves the previous checkpoint to restore.
    directory, model = tmp_path / "b", _model()
    callback = SafeBackupAndRestore(str(directory), double_checkpoint=False, delete_checkpoint=False)
    model.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=[callback])
    assert sorted(os.listdir(directory)) == [LATEST_W, LATEST_M]
    assert inspect_backup(str(directory)).epoch == 2
    _fail_the_metadata_of_epoch_3(directory, model, callback, monkeypatch)


def test_a_resume_restores_weights_optimizer_and_epoch(two_epochs, tmp_path):
    directory = _copy(two_epochs, tmp_path)
    fresh = _model()
    restored = []

    class Capture(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not restored:
                restored.extend(w.numpy() for w in fresh.weights + fresh.optimizer.variables)

    callback = SafeBackupAndRestore(str(directory), delete_checkpoint=False)
    history = fresh.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[callback, Capture()])
    assert history.epoch == [2]
    assert callback.restored.epoch == 2 and not callback.restored.previous
    for got, want in zip(restored, two_epochs[1]):
        np.testing.assert_array_equal(got, want)


def _damage(directory, damage):
    if damage == "truncated weights":
        truncate(directory / LATEST_W)
    elif damage == "metadata missing":
        (directory / LATEST_M).unlink()
    elif damage == "weights missing":
        (directory / LATEST_W).unlink()
    elif damage == "garbage metadata":
        (directory / LATEST_M).write_bytes(b'{"epoch": 2, "wei')
    elif damage == "epoch not a count":
        meta = json.loads((directory / LATEST_M).read_text())
        (directory / LATEST_M).write_text(json.dumps({**meta, "epoch": "2"}))
    elif damage == "latest pair missing":
        (directory / LATEST_W).unlink()
        (directory / LATEST_M).unlink()
    else:  # a same-sized file that is not the one the metadata was written with
        shutil.copyfile(directory / PREV_W, directory / LATEST_W)


@pytest.mark.parametrize("damage", ["truncated weights", "metadata missing", "weights missing",
                                    "garbage metadata", "epoch not a count",
                                    "weights of the previous epoch", "latest pair missing"])
def test_a_damaged_latest_checkpoint_gives_way_to_the_previous_one(two_epochs, tmp_path, damage):
    directory = _copy(two_epochs, tmp_path)
    _damage(directory, damage)
    checkpoint = inspect_backup(str(directory))
    assert (checkpoint.epoch, checkpoint.previous) == (1, True), checkpoint
    assert LATEST_W in checkpoint.problem or LATEST_M in checkpoint.problem


def test_fit_restores_the_previous_checkpoint_and_says_so(two_epochs, tmp_path, caplog):
    directory = _copy(two_epochs, tmp_path)
    _damage(directory, "truncated weights")
    caplog.set_level(py_logging.WARNING)
    _, history, _ = _fit(directory, 3)
    assert history.epoch == [1, 2]
    assert "Restoring the previous checkpoint" in caplog.text and "(epoch 1)" in caplog.text
    assert json.loads((directory / LATEST_M).read_text())["epoch"] == 3
    assert inspect_backup(str(directory)).epoch == 3


@pytest.mark.parametrize("damage", ["both truncated", "only weights left"])
def test_no_complete_checkpoint_is_one_line_naming_the_files(two_epochs, tmp_path, damage):
    directory = _copy(two_epochs, tmp_path)
    if damage == "both truncated":
        for name in os.listdir(directory):
            truncate(directory / name)
    else:
        for name in (LATEST_M, PREV_W, PREV_M):
            (directory / name).unlink()
    before = _bytes(directory)
    with pytest.raises(BackupError) as error:
        _fit(directory, 3)
    message = str(error.value)
    assert "\n" not in message and f"the backup in {directory} is damaged" in message
    expected = ([f"{LATEST_M} is unreadable (JSONDecodeError", f"previous copy: {PREV_M} is unreadable"]
                if damage == "both truncated" else [f"is damaged: {LATEST_M} is missing"])
    assert all(fragment in message for fragment in expected), message
    assert _bytes(directory) == before  # nothing moved, deleted or rewritten


def test_a_backup_that_does_not_fit_the_model_is_one_line(two_epochs, tmp_path):
    directory = _copy(two_epochs, tmp_path)
    with pytest.raises(BackupError, match="does not fit this model") as error:
        _fit(directory, 3, model=_model(units=5))
    assert "\n" not in str(error.value)


# (optimizer saved, optimizer resumed, what the error says)
OPTIMIZERS = {
    "another gradient_accumulation_steps": (
        lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
        lambda: keras.optimizers.Adam(0.01),
        "optimizer: it was saved with gradient_accumulation_steps=2, this optimizer has 1"),
    "another optimizer": (  # nothing recorded tells: the numbers of variables do
        lambda: keras.optimizers.Adam(0.01), lambda: keras.optimizers.SGD(0.01),
        "optimizer: it holds 10 optimizer variables where this optimizer has 2 (another"),
}


@pytest.mark.parametrize("case", OPTIMIZERS)
def test_a_backup_of_an_optimizer_with_other_variables_is_one_line(tmp_path, case):
    saved, resumed, message = OPTIMIZERS[case]
    _fit(tmp_path / "b", 1, model=_model(optimizer=saved()))
    before = _bytes(tmp_path / "b")
    model = _model(optimizer=resumed())
    weights = model.get_weights()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(BackupError) as error:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", 2, model=model)
    for a, b in zip(weights, model.get_weights()):  # not the backup's: nothing restored
        np.testing.assert_array_equal(a, b)
    assert "\n" not in str(error.value) and message in str(error.value), error.value
    assert f"the backup in {tmp_path / 'b'} (epoch 1) does not fit this model's" in str(error.value)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]  # said once
    assert _bytes(tmp_path / "b") == before


def test_another_number_of_accumulation_steps_restores_the_whole_state(tmp_path):
    _fit(tmp_path / "b", 1, model=_model(optimizer=keras.optimizers.Adam(
        0.01, gradient_accumulation_steps=2)))
    with warnings.catch_warnings(record=True) as caught:  # the same variables: all restored
        warnings.simplefilter("always")
        _, history, callback = _fit(tmp_path / "b", 2, model=_model(
            optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=4)))
    assert history.epoch == [1] and callback.restored.gradient_accumulation_steps == 2
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]


def test_no_backup_starts_at_epoch_zero_and_restore_false_ignores_one(two_epochs, tmp_path):
    assert inspect_backup(str(tmp_path / "none")) is None
    directory = _copy(two_epochs, tmp_path)
    _, history, callback = _fit(directory, 2, restore=False)
    assert history.epoch == [0, 1] and callback.restored is None


def test_a_backup_keras_itself_wrote_is_restored_and_its_damage_found(tmp_path):
    model = _model()
    keras_backup = keras.callbacks.BackupAndRestore(str(tmp_path / "k"), double_checkpoint=True,
                                                    delete_checkpoint=False)
    model.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=[keras_backup])
    shutil.copytree(tmp_path / "k", tmp_path / "damaged")
    _, history, _ = _fit(tmp_path / "k", 3)  # rewrites it with checksums from epoch 3 on
    assert history.epoch == [2] and "weights_sha256" in (tmp_path / "k" / LATEST_M).read_text()
    truncate(tmp_path / "damaged" / LATEST_W)  # no checksum to compare: HDF5 cannot open it
    checkpoint = inspect_backup(str(tmp_path / "damaged"))
    assert checkpoint.previous and "not a readable HDF5 file" in checkpoint.problem


def test_a_save_that_fails_half_way_leaves_the_last_complete_checkpoint(two_epochs, tmp_path):
    directory = _copy(two_epochs, tmp_path)
    before = _bytes(directory)
    size = (directory / LATEST_W).stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    class FillTheDisk(keras.callbacks.Callback):  # before the backup's save of epoch 3
        def on_epoch_end(self, epoch, logs=None):
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))

    try:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        with pytest.raises(OSError):
            callback = SafeBackupAndRestore(str(directory), delete_checkpoint=False)
            _model().fit(X, Y, epochs=3, batch_size=8, verbose=0,
                         callbacks=[FillTheDisk(), callback])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert _bytes(directory) == before  # no temporary file left, nothing half written
    _, history, _ = _fit(directory, 3)  # and the next run resumes after epoch 2
    assert history.epoch == [2]


def test_a_keras_that_no_longer_calls_the_save_hook_fails_loudly(tmp_path):
    class Renamed(SafeBackupAndRestore):  # as if Keras called another method to save
        _save_model = keras.callbacks.BackupAndRestore._save_model

    with pytest.raises(_compat.KerasInternalsChanged, match="on_epoch_end calling _save_model"):
        _model().fit(X, Y, epochs=1, verbose=0, callbacks=[Renamed(str(tmp_path / "b"))])


@pytest.mark.parametrize("written_by", ["keras", "tfmp"])
def test_a_save_that_fails_writing_the_metadata_restores_the_previous_checkpoint(
        tmp_path, monkeypatch, written_by):
    # The new weights are in place, their metadata is not: they must not pass for the latest
    # checkpoint (Keras' own metadata has no checksum to tell), and a retry of the same
    # callback must not copy them over the complete previous one.
    directory, model = tmp_path / "b", _model()
    first = (keras.callbacks.BackupAndRestore(str(directory), double_checkpoint=True,
                                              delete_checkpoint=False)
             if written_by == "keras" else
             SafeBackupAndRestore(str(directory), delete_checkpoint=False))
    model.fit(X, Y, epochs=2, batch_size=8, verbose=0, callbacks=[first])
    callback = SafeBackupAndRestore(str(directory), delete_checkpoint=False)
    _fail_the_metadata_of_epoch_3(directory, model, callback, monkeypatch)
    monkeypatch.undo()
    history = model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])  # again
    assert history.epoch == [2]
    latest, previous = (json.loads((directory / m).read_text())["epoch"] for m in (LATEST_M, PREV_M))
    assert (latest, previous) == (3, 2) and inspect_backup(str(directory)).epoch == 3
    problem, meta = backup_module._problem(str(directory / PREV_W), str(directory / PREV_M))
    assert problem is None and meta["epoch"] == 2
