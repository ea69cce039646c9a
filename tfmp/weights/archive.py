"""`tfmp.weights.save_model`: a `.keras` file whose weights are 16-bit release weights."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Optional

import keras

from tfmp.atomic import atomic_path
from tfmp.weights.half import (HalfWeightsReport, check_arguments, check_destination,
                               write_weights)

WEIGHTS_ENTRY = "model.weights.h5"  # where a .keras archive keeps its weights
CONFIG_ENTRY = "config.json"  # and its config, the compile settings in "compile_config"


def save_model(model: keras.Model, path: str, dtype: str = "bfloat16", *,
               keep_float32: Optional[str] = None) -> HalfWeightsReport:
    """`model.save(path)` with the weights in 16 bits and no training set-up (atomically).

    The `.keras` archive Keras writes (config, metadata), its weights entry replaced by
    `tfmp.save_weights`' 16-bit file, which holds no optimizer state, and its compile
    settings left out as for a model never compiled: `keras.models.load_model` reads it
    as it is, without a warning, under the policy the model was built with, each variable
    holding the 16-bit value as float32, and returns it uncompiled (`compile` it to train
    or evaluate). Compiled, it would build the optimizer of the compile settings and warn
    that the archive holds none of its variables.

    Args:
        model: A built Keras model.
        path: The file to write; must end in `.keras`.
        dtype: `bfloat16` or `float16`.
        keep_float32: As for `tfmp.save_weights`.

    Returns:
        A `HalfWeightsReport` for the archive: its size, and `float32_bytes` the size of
        the same archive with float32 weights (and no training set-up either).

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
            _release(full, tmp, half)
            size = os.path.getsize(tmp)
        reference = os.path.join(scratch, "reference.keras")
        _release(full, reference, float32)
        float32_bytes = os.path.getsize(reference)
    return HalfWeightsReport(str(path), dtype, size, float32_bytes, report.variables,
                             report.kept_float32)


def _release(archive: str, target: str, weights: str) -> None:
    """A copy of the `.keras` `archive` at `target` holding `weights` as its weights entry, and
    in its config the compile settings of a model never compiled (Keras writes `{}`)."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            if item.filename == WEIGHTS_ENTRY:
                copy.write(weights, WEIGHTS_ENTRY, compress_type=item.compress_type)
            elif item.filename == CONFIG_ENTRY:
                config = json.loads(source.read(item.filename))
                copy.writestr(item, json.dumps({**config, "compile_config": {}}))
            else:
                copy.writestr(item, source.read(item.filename))
