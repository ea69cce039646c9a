"""What a training run leaves in its `model_dir`, and reading it back.

`tools/train --model_dir=DIR` writes `backup/` (`tfmp.callbacks.SafeBackupAndRestore`),
`tensorboard/`, `model.keras`, `summary.json` and, with `--precision=tune`,
`tune.json`; `tools/export --model_dir=DIR` reads the model and the run's flags.
Everything read back is checked first: a damaged file is a `RunDirError` naming it and
what the user can do; `restart` moves what a run resumes from aside (never deleting it);
`remove_leftovers` deletes the temporary files of saves killed mid-write, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Optional

from absl import logging

from tfmp._messages import first_line
from tfmp.atomic import temporary_target
from tfmp.callbacks.backup import (BackupError, Checkpoint, inspect_backup,
                                   interrupted_first_save, other_accumulation)
from tfmp.precision.policy import POLICIES

BACKUP, TENSORBOARD, FINAL_MODEL, SUMMARY = "backup", "tensorboard", "model.keras", "summary.json"
TUNED = "tune.json"  # the policy --precision=tune chose, kept so that a resumed run keeps it
WRITTEN = (FINAL_MODEL, SUMMARY, TUNED)  # what a run writes in model_dir through a temporary file


class RunDirError(ValueError):
    """A run directory that cannot be read back; the message is one line."""


RESTART_HINT = ("--restart moves it aside under a dated name (nothing is deleted) and trains "
                "from the start")


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`, or `RunDirError` naming the file and what is wrong."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunDirError(f"{path} is damaged ({first_line(e, typed=True)})") from None
    if not isinstance(payload, dict):
        raise RunDirError(f"{path} is damaged (a JSON {type(payload).__name__}, not an object)")
    return payload


def checked_backup(backup_dir: str, grad_accum_steps: int = 1,
                   owner: bool = True) -> Optional[Checkpoint]:
    """The checkpoint a resume from `backup_dir` restores (None: nothing to resume).

    A backup holding nothing but the weights of a first save interrupted before its
    metadata was written (no previous copy beside them) has nothing to resume: its owner
    moves it aside as `restart` does (logged), and None is returned.

    Args:
        backup_dir: The run's backup directory.
        grad_accum_steps: This run's `--grad_accum_steps`.
        owner: Whether this process writes `backup_dir` (a non-chief worker restores from
            the chief's backup and leaves it to the chief).

    Returns:
        The latest complete checkpoint (see `tfmp.callbacks.inspect_backup`), or None.

    Raises:
        RunDirError: backup files are there but none is complete, or the checkpoint's
            optimizer accumulated gradients where this run's does not, or the other way
            round (`--grad_accum_steps=1` against more): its optimizer has other variables,
            and Keras would restore the weights alone.
    """
    lone = interrupted_first_save(backup_dir)
    if lone is not None:
        if owner:
            moved = move_aside(backup_dir)
            logging.warning("%s holds only %s, of a first save interrupted before its metadata "
                            "was written (nothing to resume): moved it to %s; training from the "
                            "start", backup_dir, os.path.basename(lone), moved)
        return None
    try:
        checkpoint = inspect_backup(backup_dir)
    except BackupError as e:
        raise RunDirError(f"{e}; {RESTART_HINT}") from None
    saved = checkpoint.gradient_accumulation_steps if checkpoint else None
    if other_accumulation(saved, grad_accum_steps):
        raise RunDirError(f"the backup in {backup_dir} (epoch {checkpoint.epoch}) was made with "
                          f"--grad_accum_steps={saved}, not {grad_accum_steps}: its optimizer "
                          f"state would not fit; give --grad_accum_steps={saved} to resume it, "
                          f"or {RESTART_HINT}")
    return checkpoint


def read_tuned(model_dir: Optional[str]) -> Optional[dict[str, Any]]:
    """The choice `--precision=tune` recorded in `model_dir` (None if there is none).

    Args:
        model_dir: The run directory, or None.

    Returns:
        The recorded `TuneResult.to_dict()`, or None.

    Raises:
        RunDirError: `tune.json` is there but damaged (not JSON, no known policy in it, a
            `jit_compile` that is not a bool, or an unknown `weights_dtype`).
    """
    if not model_dir or not os.path.exists(os.path.join(model_dir, TUNED)):
        return None
    path = os.path.join(model_dir, TUNED)
    hint = f"; {RESTART_HINT} (measuring again), or give --precision=<policy>"
    try:
        tuned = _read_json(path)
    except RunDirError as e:
        raise RunDirError(f"{e}{hint}") from None
    if tuned.get("policy") not in POLICIES or not isinstance(tuned.get("reason"), str):
        raise RunDirError(f"{path} is damaged (policy={tuned.get('policy')!r}, expected one of "
                          f"{', '.join(POLICIES)}, with a reason){hint}")
    if not isinstance(tuned.get("jit_compile", False), bool):  # absent before XLA was tuned
        raise RunDirError(f"{path} is damaged (jit_compile={tuned['jit_compile']!r}, expected "
                          f"true or false){hint}")
    if tuned.get("weights_dtype") not in (None, "bfloat16", "float16"):  # absent before bf16w
        raise RunDirError(f"{path} is damaged (weights_dtype={tuned['weights_dtype']!r}, "
                          f"expected null, \"bfloat16\" or \"float16\"){hint}")
    return tuned


def dated(path: str) -> str:
    """`<path>.<date>-<time>`, or `<path>.<date>-<time>-<n>`: a name nothing has yet.

    Args:
        path: A file or directory name.

    Returns:
        The dated name.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{path}.{stamp}", 1
    while os.path.lexists(target):
        target, n = f"{path}.{stamp}-{n}", n + 1
    return target


def move_aside(path: str) -> Optional[str]:
    """Renames `path` to `<path>.<date>-<time>` (never overwriting); None if it is not there.

    Args:
        path: A file or directory.

    Returns:
        The new path, or None.
    """
    if not os.path.lexists(path):
        return None
    target = dated(path)
    os.rename(path, target)
    return target


def restart(model_dir: str) -> list[tuple[str, str]]:
    """Moves what a run resumes from (`backup/`, `tune.json`) aside, so the run starts over.

    Args:
        model_dir: The run directory.

    Returns:
        `(old path, new path)` for each one moved.
    """
    moved = [(path, move_aside(path)) for path in
             (os.path.join(model_dir, BACKUP), os.path.join(model_dir, TUNED))]
    return [(old, new) for old, new in moved if new]


def leftovers(model_dir: str) -> list[str]:
    """The temporary files that saves killed in the middle of a write left in a run directory.

    Args:
        model_dir: The run directory.

    Returns:
        The paths of those of its `model.keras`, `summary.json` and `tune.json`, and of any
        in its `backup/`, which the backup alone writes (there the unhidden `tmp<random>`
        names of earlier versions too, `tmp*.weights.h5`).
    """
    found = []
    for directory, targets in ((model_dir, WRITTEN), (os.path.join(model_dir, BACKUP), None)):
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for name in names:
            target = temporary_target(name, unnamed=targets is None)
            path = os.path.join(directory, name)
            if target is not None and (targets is None or target in targets) and \
                    os.path.isfile(path):
                found.append(path)
    return found


def remove_leftovers(model_dir: str) -> list[str]:
    """Removes `leftovers(model_dir)`, saying so in one log line.

    Args:
        model_dir: The run directory (a run starts; nothing writes there yet).

    Returns:
        The paths removed.
    """
    removed = leftovers(model_dir)
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if removed:
        logging.warning("removed %d temporary file(s) that interrupted saves left in %s: %s",
                        len(removed), model_dir,
                        ", ".join(os.path.relpath(p, model_dir) for p in removed))
    return removed


def trained_model(model_dir: str) -> tuple[str, dict[str, Any]]:
    """The final model of a finished run and the flags it was trained with.

    Args:
        model_dir: A `tools/train --model_dir`.

    Returns:
        `(path of model.keras, flags)`.

    Raises:
        RunDirError: `model_dir` is not a directory, or holds no `model.keras`, or its
            `summary.json` is missing or damaged.
    """
    if not os.path.isdir(model_dir):
        raise RunDirError(f"--model_dir={model_dir!r} is not a directory")
    path = os.path.join(model_dir, FINAL_MODEL)
    if not os.path.isfile(path):
        raise RunDirError(f"--model_dir={model_dir!r} has no {FINAL_MODEL} (tools/train writes it "
                          "when a run ends)")
    hint = (f"; export the model with --model_path={path} (and --data, --seed for its "
            "accuracy) instead")
    summary = os.path.join(model_dir, SUMMARY)
    if not os.path.isfile(summary):
        raise RunDirError(f"{summary} is missing (tools/train writes it with {FINAL_MODEL}){hint}")
    try:
        flags = _read_json(summary).get("flags")
    except RunDirError as e:
        raise RunDirError(f"{e}{hint}") from None
    if not isinstance(flags, dict):
        raise RunDirError(f"{summary} is damaged (no 'flags' object){hint}")
    for name, kinds in (("dataset", (str,)), ("data_dir", (str, type(None))), ("seed", (int,))):
        value = flags.get(name)
        if name in flags and (not isinstance(value, kinds) or isinstance(value, bool)):
            accepted = {"str": "a string", "NoneType": "null", "int": "an integer"}
            raise RunDirError(f"{summary} is damaged (flags.{name}={value!r} is not "
                              f"{' or '.join(accepted[k.__name__] for k in kinds)}){hint}")
    return path, flags
