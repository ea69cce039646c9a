"""`SafeBackupAndRestore`: Keras' `BackupAndRestore` that survives a crash or a full disk
in the middle of a save, and checks what it restores.

Keras' `BackupAndRestore(double_checkpoint=True)` overwrites its weights file in place,
copies the previous one non-atomically and writes its metadata after the weights, so a
process killed (or a disk filled) during a save can leave the latest weights truncated,
or paired with the metadata of another epoch; its restore falls back to the previous
copy only on an `OSError` from the weights, and a truncated metadata file or two damaged
copies end in a traceback. Here:

- every save writes the new weights to a temporary file first, then keeps the last
  complete checkpoint as the previous one (a hard link, else a copy), then renames the
  new weights and writes their metadata the same way: at every moment one complete
  checkpoint is on disk, and a save that fails writing the weights changes nothing;
- the metadata records the size and SHA-256 of its weights file, so a restore knows a
  complete checkpoint from a damaged one (a backup Keras itself wrote, without them, is
  checked by opening its weights file);
- a restore takes the latest complete checkpoint (logging which one and why) and raises
  `BackupError`, one line naming the files and what is wrong with them, when the
  directory holds files but no complete checkpoint, or one that does not fit the model
  or its optimizer (Keras' own restore loads the weights and, with a warning, skips an
  optimizer state of another length: a resume with gradient accumulation of a backup saved
  without, or the other way round, would go on with fresh moments). The metadata records
  the optimizer's `gradient_accumulation_steps`, so that the message can name it.

The file names are Keras' own, so either callback can read the other's backup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Optional

import h5py  # Keras' own dependency, for .weights.h5 files
import keras
from absl import logging

from tfmp import _compat
from tfmp._messages import first_line
from tfmp.atomic import atomic_path, write_json_atomically
from tfmp.weights.layout import optimizer_variables

SHA256, SIZE = "weights_sha256", "weights_bytes"
ACCUMULATION = "gradient_accumulation_steps"  # the optimizer's, recorded in the metadata


class BackupError(ValueError):
    """A backup that cannot be restored; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint of a backup directory.

    Attributes:
        weights: Its weights file (model and optimizer variables).
        metadata: Its training metadata file.
        epoch: Epochs completed when it was saved.
        previous: It is the previous copy (the latest one is damaged or missing).
        problem: Why the latest copy was not taken (when `previous`).
        gradient_accumulation_steps: The optimizer's when it was saved (1: none; None:
            not recorded, as in a backup Keras' own `BackupAndRestore` wrote).
    """

    weights: str
    metadata: str
    epoch: int
    previous: bool = False
    problem: str = ""
    gradient_accumulation_steps: Optional[int] = None


def _assign(values: list[tuple[Any, Any]]) -> None:
    for variable, value in values:
        variable.assign(value)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count(name: str, value: Any, least: int) -> None:
    """Raises `ValueError` unless `value` is an int (not a bool) of at least `least`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}={value!r} is not a whole number of at least {least}")


def _problem(weights: str, metadata: str) -> tuple[Optional[str], dict[str, Any]]:
    """What is wrong with one (weights, metadata) pair (None: it is complete), and its metadata."""
    name_w, name_m = os.path.basename(weights), os.path.basename(metadata)
    if not os.path.isfile(metadata):
        return f"{name_m} is missing", {}
    try:
        with open(metadata) as f:
            meta = json.load(f)
        _count("epoch", meta["epoch"], 0)
        if meta.get(ACCUMULATION) is not None:
            _count(ACCUMULATION, meta[ACCUMULATION], 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{name_m} is unreadable ({first_line(e, typed=True)})", {}
    if not os.path.isfile(weights):
        return f"{name_w} is missing", meta
    if SHA256 not in meta:  # written by Keras' own BackupAndRestore: can HDF5 open it?
        try:
            h5py.File(weights, "r").close()
        except OSError as e:
            return (f"{name_w} is not a readable HDF5 file ({first_line(e, typed=True)})",
                    meta)
        return None, meta
    size = os.path.getsize(weights)
    if size != meta.get(SIZE):
        return f"{name_w} has {size} bytes where {meta.get(SIZE)} were written", meta
    if _sha256(weights) != meta[SHA256]:
        return f"{name_w} is not the file {name_m} was written with (SHA-256 differs)", meta
    return None, meta


def _files(backup_dir: str) -> tuple[tuple[str, str], tuple[str, str]]:
    paths = _compat.backup_files(backup_dir)
    return (paths.weights, paths.metadata), (paths.previous_weights, paths.previous_metadata)


def inspect_backup(backup_dir: str) -> Optional[Checkpoint]:
    """The checkpoint a restore from `backup_dir` takes: the latest complete one.

    Args:
        backup_dir: A `BackupAndRestore` / `SafeBackupAndRestore` directory.

    Returns:
        The latest complete `Checkpoint`, or None when the directory holds no backup
        file at all (nothing to restore: training starts at epoch 0).

    Raises:
        BackupError: backup files are there but none is a complete checkpoint.
    """
    latest, previous = _files(backup_dir)
    if not any(os.path.exists(p) for p in (*latest, *previous)):
        return None
    problem, meta = _problem(*latest)
    if problem is None:
        return Checkpoint(*latest, meta["epoch"],
                          gradient_accumulation_steps=meta.get(ACCUMULATION))
    if any(os.path.exists(p) for p in previous):
        previous_problem, meta = _problem(*previous)
        if previous_problem is None:
            return Checkpoint(*previous, meta["epoch"], previous=True, problem=problem,
                              gradient_accumulation_steps=meta.get(ACCUMULATION))
        problem += f"; previous copy: {previous_problem}"
    raise BackupError(f"the backup in {backup_dir} is damaged: {problem}")


def interrupted_first_save(backup_dir: str) -> Optional[str]:
    """The weights file of a first save killed before its metadata was written, when that is
    all of a backup `backup_dir` holds (no metadata, no previous copy), else None.

    Such weights belong to no recorded epoch: there is nothing to resume from them.

    Args:
        backup_dir: A `BackupAndRestore` / `SafeBackupAndRestore` directory.

    Returns:
        The path of the lone weights file, or None.
    """
    (weights, metadata), previous = _files(backup_dir)
    if os.path.isfile(weights) and not any(os.path.lexists(p) for p in (metadata, *previous)):
        return weights
    return None


def accumulation_steps(optimizer: keras.optimizers.Optimizer) -> int:
    """An optimizer's `gradient_accumulation_steps` (1: none), or the one of the optimizer a
    loss-scale optimizer wraps (`inner_optimizer`), which is where it is set."""
    while optimizer is not None:
        if optimizer.gradient_accumulation_steps:
            return int(optimizer.gradient_accumulation_steps)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return 1


def other_accumulation(saved: Optional[int], steps: int) -> bool:
    """Whether an optimizer state saved with `saved` gradient accumulation steps has other
    variables than an optimizer accumulating `steps` (accumulators come with 2 or more).

    Args:
        saved: The backup's `gradient_accumulation_steps` (None: not recorded).
        steps: This optimizer's (1: none).

    Returns:
        True when exactly one of them accumulates.
    """
    return saved is not None and (saved > 1) != (steps > 1)


def _optimizer_mismatch(optimizer: Optional[keras.optimizers.Optimizer],
                        checkpoint: Checkpoint) -> Optional[str]:
    """How `checkpoint`'s optimizer state does not fit `optimizer` (built), or None."""
    if optimizer is None:
        return None
    steps, saved = accumulation_steps(optimizer), checkpoint.gradient_accumulation_steps
    if other_accumulation(saved, steps):
        return f"it was saved with {ACCUMULATION}={saved}, this optimizer has {steps}"
    with h5py.File(checkpoint.weights, "r") as f:
        count = optimizer_variables(f)
    if count != len(optimizer.variables):
        return (f"it holds {count} optimizer variables where this optimizer has "
                f"{len(optimizer.variables)} (another optimizer, or other arguments to it)")
    return None


def _identity(path: str) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: inode, size, modification time."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _link_or_copy(source: str, target: str) -> None:
    """`target` becomes the file `source` is now, atomically (a hard link, else a copy)."""
    with atomic_path(target, os.path.splitext(target)[1]) as tmp:
        try:
            os.remove(tmp)
            os.link(source, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, tmp)


class SafeBackupAndRestore(_compat.BackupWithOwnSave):
    """`keras.callbacks.BackupAndRestore` whose saves survive a crash or a full disk, and
    whose restore checks the files and says what it restored.

    Takes Keras' arguments, in Keras' order, with Keras' meaning. Every save keeps the
    last complete checkpoint as the previous copy (Keras' `.bkp` files) until the new
    one is complete, whatever `double_checkpoint` says: that is what makes the save
    safe. `double_checkpoint` says whether the previous copy stays once the new
    checkpoint is complete: True (the default here; Keras' is False) keeps two
    checkpoints on disk, as Keras' `double_checkpoint=True` does; False deletes the
    previous copy after each complete save, leaving one, as Keras' default does. A
    restore takes the previous copy whenever the latest checkpoint is damaged and it
    is there (after a crash in the middle of a save, under either setting). A save
    that fails raises (an `OSError`) and leaves the last complete checkpoint in place;
    one that fails while writing the new weights changes nothing on disk.

    Args:
        backup_dir: Where the backup is saved.
        save_freq: `"epoch"`, or a number of batches (as Keras').
        double_checkpoint: Keep the previous checkpoint beside the latest one (True,
            the default), or only while a save is under way (False).
        delete_checkpoint: Delete the backup when training ends (as Keras').
        restore_dir: Where to restore from, if not `backup_dir` (a non-chief worker
            restores from the chief's backup, so that every worker resumes in step).
        restore: False to start from scratch whatever `restore_dir` holds.

    Raises:
        ValueError: `backup_dir` is empty, `save_freq` is neither `"epoch"` nor an
            integer (Keras' checks), or `double_checkpoint` is not True or False.
        BackupError: (at the start of `fit`) the backup is damaged, or does not fit
            the model, or its optimizer (another optimizer, or accumulating gradients
            where the backup's did not, or the other way round).

    Example:
    >>> model.fit(x, y, epochs=10,
    ...           callbacks=[tfmp.callbacks.SafeBackupAndRestore("/tmp/backup")])
    """

    def __init__(self, backup_dir: str, save_freq: Any = "epoch", double_checkpoint: bool = True,
                 delete_checkpoint: bool = True, *, restore_dir: Optional[str] = None,
                 restore: bool = True) -> None:
        if not isinstance(double_checkpoint, bool):
            raise ValueError("`double_checkpoint` must be True or False; got "
                             f"double_checkpoint={double_checkpoint!r}.")
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=double_checkpoint,
                         delete_checkpoint=delete_checkpoint)
        self.restore_dir = restore_dir or backup_dir
        self.restore = restore
        self.restored: Optional[Checkpoint] = None
        self._saved: Optional[tuple[str, tuple[int, ...]]] = None  # the last save's SHA, _identity

    def on_train_begin(self, logs=None) -> None:
        self.restored = inspect_backup(self.restore_dir) if self.restore else None
        if self.restored is None:
            return
        checkpoint = self.restored
        if checkpoint.previous:
            logging.warning("Restoring the previous checkpoint of %s (epoch %d): %s.",
                            self.restore_dir, checkpoint.epoch, checkpoint.problem)
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # as Keras does before loading
        where = f"the backup in {self.restore_dir} (epoch {checkpoint.epoch})"
        # What the model and its optimizer hold now, given back when the backup does not fit:
        # a caller who catches the error keeps the state it had, not half a restore.
        before = [(v, v.numpy()) for v in [*self.model.weights,
                                             *(optimizer.variables if optimizer else [])]]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                # Keras loads only files named *.weights.h5, not the previous copy's *.bkp
                weights = os.path.join(tmp, "restored.weights.h5")
                _link_or_copy(checkpoint.weights, weights)
                mismatch = _optimizer_mismatch(optimizer, checkpoint)
                with warnings.catch_warnings():  # Keras' warning for it: the error below says it
                    if mismatch:
                        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
                    self.model.load_weights(weights)
        except (OSError, ValueError) as e:
            _assign(before)
            raise BackupError(f"{where} does not fit this model "
                              f"({first_line(e, lines=3, typed=True)})") from None
        if mismatch:  # raised after the load: a model of another architecture is named as such
            _assign(before)
            raise BackupError(f"{where} does not fit this model's optimizer: {mismatch}; "
                              "Keras would restore the weights alone")
        _compat.resume_after_epoch(self.model, checkpoint.epoch)

    def save_backup(self) -> None:
        """Every save Keras makes (`_compat.BackupWithOwnSave`): the weights, then their metadata."""
        (weights, metadata), (previous_weights, previous_metadata) = _files(self.backup_dir)
        os.makedirs(self.backup_dir, exist_ok=True)
        with atomic_path(weights, ".weights.h5") as tmp:
            self.model.save_weights(tmp, overwrite=True)  # a failure here changes nothing
            size, sha = os.path.getsize(tmp), _sha256(tmp)
            if self._latest_is_complete(weights, metadata):  # it becomes the previous one
                _link_or_copy(metadata, previous_metadata)
                _link_or_copy(weights, previous_weights)
            if os.path.exists(metadata):  # never the new weights beside the old metadata
                os.remove(metadata)
        # Until the metadata below is written, the previous checkpoint is the complete one.
        epoch, batch = _compat.backup_progress(self)
        progress = {"epoch": epoch, "batch": batch, SIZE: size, SHA256: sha}
        if self.model.optimizer is not None:
            progress[ACCUMULATION] = accumulation_steps(self.model.optimizer)
        write_json_atomically(metadata, progress)
        self._saved = (sha, _identity(weights))
        if not self.double_checkpoint:  # the previous copy was needed only during the save
            for path in (previous_metadata, previous_weights):
                if os.path.exists(path):
                    os.remove(path)

    def _latest_is_complete(self, weights: str, metadata: str) -> bool:
        """Whether the latest pair is complete (known without reading it when this callback
        wrote it and it is unchanged since)."""
        if not (os.path.isfile(weights) and os.path.isfile(metadata)):
            return False
        saved = self._saved
        if saved is not None and _identity(weights) == saved[1]:
            try:
                with open(metadata) as f:
                    if json.load(f).get(SHA256) == saved[0]:
                        return True
            except (OSError, ValueError, AttributeError):
                return False
        return _problem(weights, metadata)[0] is None
