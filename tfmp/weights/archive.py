"""`tfmp.weights.save_model`: a `.keras` file whose weights are 16-bit release weights."""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Optional

import keras

from tfmp.atomic import atomic_path
from tfmp.weights.half import (HalfWeightsReport, check_arguments, check_destination,
                               write_weights)

WEIGHTS_ENTRY = "model.weights.h5"  # where a .keras archive keeps its weights


def save_model(model: keras.Model, path: str, dtype: str = "bfloat16", *,
               keep_float32: Optional[str] = None) -> HalfWeightsReport:
    """`model.save(path)` with the weights in 16 bits and no optimizer state (atomically).

    The `.keras` archive Keras writes (config, compile settings, metadata), its weights
    entry replaced by `tfmp.save_weights`' 16-bit file: `keras.models.load_model` reads
    it as it is, under the policy the model was built with, each variable holding the
    16-bit value as float32; a compiled model comes back compiled with a fresh optimizer.

    Args:
        model: A built Keras model.
        path: The file to write; must end in `.keras`.
        dtype: `bfloat16` or `float16`.
        keep_float32: As for `tfmp.save_weights`.

    Returns:
        A `HalfWeightsReport` for the archive: its size, and `float32_bytes` the size of
        the same archive with float32 weights (and no optimizer state either).

    Raises:
        WeightsFileError: a bad `path`, or what `tfmp.save_weights` refuses. Nothing is
            written then.
    """
    check_arguments(dtype, keep_float32)
    check_destination(path, ".keras")
    with tempfile.TemporaryDirectory() as scratch:
        full = os.path.join(scratch, "float32.keras")
        model.save(full)
        half = os.path.join(scratch, "half.weights.h5")
        report = write_weights(model, half, dtype, keep_float32, measure=False)
        float32 = os.path.join(scratch, "float32.weights.h5")  # the reference archive's
        write_weights(model, float32, "float32", measure=False)
        with atomic_path(path, ".keras") as tmp:
            _with_weights(full, tmp, half)
            size = os.path.getsize(tmp)
        reference = os.path.join(scratch, "reference.keras")
        _with_weights(full, reference, float32)
        float32_bytes = os.path.getsize(reference)
    return HalfWeightsReport(str(path), dtype, size, float32_bytes, report.variables,
                             report.kept_float32)


def _with_weights(archive: str, target: str, weights: str) -> None:
    """A copy of the `.keras` `archive` at `target` holding `weights` as its weights entry."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            if item.filename == WEIGHTS_ENTRY:
                copy.write(weights, WEIGHTS_ENTRY, compress_type=item.compress_type)
            else:
                copy.writestr(item, source.read(item.filename))
