"""`tools/audit`'s work on a saved model: audit it as it was built, and fix it keeping its compile settings."""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np

from tfmp.app.data import DatasetError, check_fits, input_kind, synthetic
from tfmp.rewrite import AuditReport, OverflowReport, audit, enforce_float32, locate_overflows
from tfmp.rewrite.classify import model_policy
from tfmp.rewrite.inplace import is_copyable


def audit_saved(model: keras.Model) -> AuditReport:
    """Audits a loaded model against the policy it was built with (not Keras' global one).

    Args:
        model: A model loaded from a `.keras` file.

    Returns:
        The `AuditReport` (its optimizer checked when the model was compiled).
    """
    return audit(model, getattr(model, "optimizer", None), policy=model_policy(model))


def fixed_copy(model: keras.Model) -> keras.Model:
    """`tfmp.enforce_float32(model)`, compiled as `model` was (same loss, metrics, optimizer config).

    Args:
        model: A Sequential or Functional model of Keras' own classes.

    Returns:
        The fixed copy.

    Raises:
        ValueError: any other kind of model (one line): its fix would be made in place,
            and a `.keras` file does not keep it.
    """
    if not is_copyable(model):
        raise ValueError(
            f"cannot write a fixed copy of {model.name!r}: it is a {type(model).__name__}, which "
            "Keras re-creates through its own constructor when loading, so per-layer dtypes are "
            "not kept in a .keras file; fix it in its code, or call tfmp.prepare() or "
            "tfmp.convert_policy() on it after loading")
    fixed = enforce_float32(model)
    compile_config = model.get_compile_config() if model.compiled else None
    if compile_config:
        fixed.compile_from_config(compile_config)
    return fixed


def calibration_data(model: keras.Model, data: str, batch_size: int = 32, seed: int = 0) -> Any:
    """The batches `tools/audit --locate_overflows` runs a saved model on.

    Args:
        model: The loaded model.
        data: `synthetic` (tools/train's built-in task for the model's input kind: the
            reference models' data) or a `.npz` file holding an array `x` (and `y`, the
            targets, for the gradient figures).
        batch_size: The batch size.
        seed: The seed of the synthetic examples.

    Returns:
        A `tf.data.Dataset`, or `(x, y)` / `x` arrays.

    Raises:
        DatasetError: an unknown `data`, a missing or unreadable file, no `x` in it, or
            examples of another shape than the model takes (one line).
    """
    if data == "synthetic":
        task = synthetic(input_kind(model), batch_size, seed)
        check_fits(model, task)
        return task.train
    if not data.endswith(".npz"):
        raise DatasetError(f"--data={data!r}: give 'synthetic' or a .npz file with an array "
                           "'x' (the model's inputs) and optionally 'y' (its targets)")
    if not os.path.isfile(data):
        raise DatasetError(f"--data={data!r}: no such file")
    try:
        with np.load(data) as arrays:
            loaded = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as e:
        raise DatasetError(f"--data={data!r} is not a readable .npz file ({e})") from None
    if "x" not in loaded:
        raise DatasetError(f"--data={data!r} has no array 'x' (it has: "
                           f"{', '.join(sorted(loaded)) or 'none'})")
    return (loaded["x"], loaded["y"]) if "y" in loaded else loaded["x"]


def locate_saved(model: keras.Model, data: Any, *, policy: str = "mixed_float16",
                 steps: int = 8, batch_size: int = 32) -> OverflowReport:
    """`tfmp.locate_overflows` on a loaded model, with its compiled loss when it has one.

    Args:
        model: The loaded model.
        data: What `calibration_data` returned.
        policy: The 16-bit policy to check.
        steps: Batches to run.
        batch_size: The batch size when `data` are arrays.

    Returns:
        The `OverflowReport`.

    Raises:
        ValueError: see `tfmp.locate_overflows`.
    """
    loss = getattr(model, "loss", None) if model.compiled else None
    return locate_overflows(model, data, steps=steps, policy=policy, loss=loss,
                            batch_size=batch_size)
