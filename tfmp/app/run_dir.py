"""What a training run leaves in its `model_dir`, and reading it back.

`tools/train --model_dir=DIR` writes `backup/` (Keras' `BackupAndRestore`),
`tensorboard/`, `model.keras`, `summary.json` and, with `--precision=tune`,
`tune.json`; `tools/export --model_dir=DIR` reads the model and the run's flags.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from tfmp import _compat

BACKUP, TENSORBOARD, FINAL_MODEL, SUMMARY = "backup", "tensorboard", "model.keras", "summary.json"
TUNED = "tune.json"  # the policy --precision=tune chose, kept so that a resumed run keeps it


class RunDirError(ValueError):
    """A run directory that cannot be read back; the message is one line."""


def backup_epoch(backup_dir: str) -> int:
    """Epochs completed according to a `BackupAndRestore` directory (0 if none).

    Read the way Keras restores: its training metadata, else the previous copy.

    Args:
        backup_dir: The backup directory.

    Returns:
        The number of completed epochs.
    """
    for path in _compat.backup_metadata_files(backup_dir):
        try:
            with open(path) as f:
                return int(json.load(f)["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 0


def read_tuned(model_dir: Optional[str]) -> Optional[dict[str, Any]]:
    """The choice `--precision=tune` recorded in `model_dir` (None if there is none).

    Args:
        model_dir: The run directory, or None.

    Returns:
        The recorded `TuneResult.to_dict()`, or None.
    """
    if not model_dir or not os.path.exists(os.path.join(model_dir, TUNED)):
        return None
    with open(os.path.join(model_dir, TUNED)) as f:
        return json.load(f)


def trained_model(model_dir: str) -> tuple[str, dict[str, Any]]:
    """The final model of a finished run and the flags it was trained with.

    Args:
        model_dir: A `tools/train --model_dir`.

    Returns:
        `(path of model.keras, flags)`; the flags are empty when `summary.json` is
        missing or unreadable.

    Raises:
        RunDirError: `model_dir` is not a directory, or holds no `model.keras`.
    """
    if not os.path.isdir(model_dir):
        raise RunDirError(f"--model_dir={model_dir!r} is not a directory")
    path = os.path.join(model_dir, FINAL_MODEL)
    if not os.path.isfile(path):
        raise RunDirError(f"--model_dir={model_dir!r} has no {FINAL_MODEL} (tools/train writes it "
                          "when a run ends)")
    try:
        with open(os.path.join(model_dir, SUMMARY)) as f:
            return path, json.load(f).get("flags", {})
    except (OSError, ValueError):
        return path, {}
