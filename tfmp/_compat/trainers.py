"""Keras' trainer and callback internals: instance steps, metrics riding on the model,
BackupAndRestore's files and saving switches."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import keras

from tfmp._compat.base import changed, relying_on

def wrap_step(model: Any, name: str, wrapper: Callable[[Callable], Callable]) -> None:
    """Replaces `model.<name>` (`train_step` / `test_step`) on this instance only with
    `wrapper(original)`, and drops an already traced step function so Keras traces anew."""
    with relying_on(f"Trainer.{name} and Trainer.{name.split('_')[0]}_function"):
        setattr(model, name, wrapper(getattr(model, name)))
        function = f"{name.split('_')[0]}_function"
        if getattr(model, function, None) is not None:
            setattr(model, function, None)


def model_metrics(model: Any) -> list:
    """The metric objects a model tracks itself (`model._metrics`), where a metric set as
    a model attribute lands and whose results Keras puts in every step's logs."""
    with relying_on("Layer._metrics"):
        return list(model._metrics)


def attach_metric(model: Any, metric: Any) -> None:
    """Adds `metric` to the metrics a model tracks itself (`model._metrics`), whose results
    Keras puts in every step's logs. Setting it as an attribute does the same but is refused
    on a built subclassed model ("cannot add new elements of state")."""
    with relying_on("Layer._metrics"):
        model._metrics.append(metric)


def forget_train_function(model: Any) -> None:
    """Drops a traced train step, so the next `fit` traces it again (with new metrics)."""
    if getattr(model, "train_function", None) is not None:
        model.train_function = None


def forget_traced_functions(model: Any) -> None:
    """Drops the traced train, test and predict steps, so the next call traces them again
    (after the model's layers changed their dtype policies)."""
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def traced_functions(models: Any) -> list[tuple[Any, str, Any]]:
    """`(model, name, function)` for every traced train, test and predict step of `models`,
    for `restore_traced_functions` after a change that `forget_traced_functions` undid
    (a policy changed and changed back in the middle of `fit`, whose loop calls
    `model.train_function` again at the next step)."""
    return [(model, name, getattr(model, name)) for model in models
            for name in ("train_function", "test_function", "predict_function")
            if getattr(model, name, None) is not None]


def restore_traced_functions(saved: list[tuple[Any, str, Any]]) -> None:
    """Puts back what `traced_functions` returned."""
    for model, name, function in saved:
        setattr(model, name, function)


def suspend_saving(callback: Any) -> dict[str, Any]:
    """Stops a `BackupAndRestore` / `ModelCheckpoint` from saving and from deleting its
    backup at the end of training; returns what to `setattr` back to undo it.

    Both callbacks read their public constructor arguments `save_freq` and
    `delete_checkpoint` at every epoch and at the end of training.
    """
    saved: dict[str, Any] = {}
    with relying_on(f"{type(callback).__name__}.save_freq"):
        if isinstance(callback, (keras.callbacks.BackupAndRestore, keras.callbacks.ModelCheckpoint)):
            saved["save_freq"] = callback.save_freq
            callback.save_freq = sys.maxsize  # no end-of-epoch or batch save
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            saved["delete_checkpoint"] = callback.delete_checkpoint
            callback.delete_checkpoint = False
    return saved


@dataclasses.dataclass(frozen=True)
class BackupFiles:
    """The files of a `BackupAndRestore(backup_dir, double_checkpoint=True)` directory."""

    weights: str
    metadata: str
    previous_weights: str
    previous_metadata: str


def backup_files(backup_dir: str) -> BackupFiles:
    """Where `BackupAndRestore(backup_dir, double_checkpoint=True)` writes its weights, its
    training metadata, and their previous copies (read in that order when Keras restores)."""
    with relying_on("BackupAndRestore._weights_path / _training_metadata_path / _prev_*"):
        backup = keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True)
        return BackupFiles(backup._weights_path, backup._training_metadata_path,
                           backup._prev_weights_path, backup._prev_training_metadata_path)


BACKUP_SAVE_HOOK = "_save_model"  # what BackupAndRestore.on_epoch_end / on_train_batch_end call


def backup_progress(callback: Any) -> tuple[int, int]:
    """`(epochs completed, last batch seen)` as a `BackupAndRestore` records them when it saves."""
    with relying_on("BackupAndRestore._current_epoch / _last_batch_seen"):
        return callback._current_epoch, callback._last_batch_seen


class BackupWithOwnSave(keras.callbacks.BackupAndRestore):
    """A `BackupAndRestore` whose every save is its `save_backup` (Keras calls the private hook
    `BACKUP_SAVE_HOOK` from `on_epoch_end` and `on_train_batch_end`); an epoch end that does not
    reach it (Keras renamed the hook) raises `KerasInternalsChanged` instead of saving Keras'
    way unnoticed."""

    def save_backup(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def _save_model(self) -> None:  # BACKUP_SAVE_HOOK
        self._backup_saved = True
        self.save_backup()

    def on_epoch_end(self, epoch, logs=None) -> None:
        self._backup_saved = False
        super().on_epoch_end(epoch, logs)
        check_backup_saved(self, self._backup_saved)


def check_backup_saved(callback: Any, saved: bool) -> None:
    """Raises if an epoch-end of a `BackupAndRestore` subclass did not reach its override
    of `BACKUP_SAVE_HOOK` (Keras renamed the hook: the save would not be the subclass's)."""
    if callback.save_freq == "epoch" and not saved:
        raise changed(f"BackupAndRestore.on_epoch_end calling {BACKUP_SAVE_HOOK}",
                      AttributeError(f"{type(callback).__name__}.{BACKUP_SAVE_HOOK} was not called"))


def resume_after_epoch(model: Any, epoch: int) -> None:
    """Makes the next `fit` start after `epoch` completed epochs, as `BackupAndRestore` does
    (`model._initial_epoch`, which `fit` reads in place of its `initial_epoch`)."""
    with relying_on("Trainer._initial_epoch"):
        model._initial_epoch  # noqa: B018 (present before it is set: Keras reads it in fit)
        model._initial_epoch = epoch


def compile_arguments(model: Any) -> dict:
    """The arguments a compiled model's `compile()` was called with, as given (objects, not
    their serialized configs: a custom loss function need not be registered), from
    `Trainer._compile_config` (`get_compile_config()` serializes them); {} if not compiled."""
    if not getattr(model, "compiled", False):
        return {}
    with relying_on("Trainer._compile_config"):
        return dict(model._compile_config.config)


def forget_compilation(model: Any) -> None:
    """Marks a model not compiled (`Trainer.compiled`), so that cloning it (`clone_model`,
    which recompiles a compiled model from its serialized compile config) does not need the
    user's loss, metrics or optimizer to be registered; the caller compiles the result."""
    model.compiled = False
