"""`tfmp.save_weights` / `tfmp.load_weights`: release weights in 16 bits, reloadable under any policy.

A training checkpoint stays float32 (master weights, optimizer state: what a resume
needs). Weights to ship or share need not: this writes a model's variables at half
the size, in Keras' own `.weights.h5` layout (HDF5), each float32 array stored as
a 16-bit floating-point HDF5 type: IEEE half for float16, and for bfloat16 a custom
HDF5 float type with bfloat16's fields (sign bit 15, 8 exponent bits at 7, bias 127,
7 mantissa bits). HDF5 converts both back to float32 on read, so Keras' own
`model.load_weights` reads the file too; `tfmp.load_weights` adds the checks: the
file's checksum, and that it was written for this architecture (the first variable
that does not fit is named, nothing is loaded). Values are rounded to nearest even
(`ml_dtypes`), so a reloaded variable equals the 16-bit rounding of the original
under every policy (variables are float32 under float32, mixed_float16 and
mixed_bfloat16). Non-trainable state (BatchNormalization's statistics) is included; the
optimizer's state (which Keras' `save_weights` adds for a compiled model) is not.

float16 holds 6.1e-5 .. 65504: a variable with values past 65504, or whose nonzero
values would all flush to zero, is refused (one line naming it), or kept in float32
in the same file with `keep_float32="overflow"` (the returned report says which).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Optional

import h5py
import keras
import numpy as np

from tfmp._messages import first_line
from tfmp.atomic import atomic_path
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.weights.layout import (LIBVER, checksum, datasets, float16_problem, variables_of,
                                 write_release)

DTYPE_ATTR = "tfmp_half_dtype"
KEPT_ATTR = "tfmp_kept_float32"
CHECKSUM_ATTR = "tfmp_sha256"
KEEP_CHOICES = (None, "overflow")


class WeightsFileError(ValueError):
    """A 16-bit weights file that cannot be written or loaded; the message is one line."""


@dataclasses.dataclass(frozen=True)
class HalfWeightsReport:
    """What `save_weights` wrote.

    Attributes:
        path: The file.
        dtype: `bfloat16` or `float16`.
        size_bytes: Its size.
        float32_bytes: The size of the same file with float32 weights.
        variables: Variables written.
        kept_float32: Variables kept in float32 (`keep_float32="overflow"`), each with why.
    """

    path: str
    dtype: str
    size_bytes: int
    float32_bytes: int
    variables: int
    kept_float32: dict[str, str]

    @property
    def size_ratio(self) -> float:
        """`size_bytes / float32_bytes`."""
        return self.size_bytes / max(self.float32_bytes, 1)


def _keras_weights(model: keras.Model, directory: str) -> str:
    """Keras' own float32 `.weights.h5` of `model`, in `directory`."""
    path = os.path.join(directory, "float32.weights.h5")
    model.save_weights(path)
    return path


def _in_model_order(model: keras.Model, names: dict[str, Any], items: list[str]) -> list[str]:
    """`items` (dataset names) sorted as their variables come in `model.weights`."""
    order = {id(v): i for i, v in enumerate(model.weights)}
    return sorted(items, key=lambda n: order.get(id(names.get(n)), len(order)))


def _label(names: dict[str, Any], dataset: str) -> str:
    variable = names.get(dataset)
    return variable.path if variable is not None else dataset


def check_arguments(dtype: str, keep_float32: Optional[str], float32: bool = False) -> None:
    """Refuses a `dtype` or `keep_float32` `save_weights` does not take, in one line.

    Args:
        dtype: The dtype asked for.
        keep_float32: The `keep_float32` asked for.
        float32: Whether `float32` (an unrounded file) is accepted.

    Raises:
        WeightsFileError: either is not accepted.
    """
    if dtype not in HALF_DTYPES + (("float32",) if float32 else ()):
        raise WeightsFileError(f"dtype={dtype!r} is not accepted; use one of {', '.join(HALF_DTYPES)}")
    if keep_float32 not in KEEP_CHOICES:
        raise WeightsFileError(f"keep_float32={keep_float32!r} is not accepted; use None or "
                               "'overflow'")


def check_destination(path: str, suffix: str) -> None:
    """Refuses a path without `suffix` or in a directory that does not exist, in one line.

    Args:
        path: The file to write.
        suffix: The suffix it must have (`.weights.h5`, `.keras`).

    Raises:
        WeightsFileError: it has not, or its directory does not exist.
    """
    if not str(path).endswith(suffix):
        raise WeightsFileError(f"path={path!r} must end in {suffix}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise WeightsFileError(f"path={path!r}: directory {directory!r} does not exist")


def _write(source: h5py.File, path: str, dtype: str, kept: dict[str, str]) -> None:
    """The release file at `path`: `source`'s model variables in `dtype` (`float32`: as they
    are, the size a float32 release would have), `kept` ones in float32, with its attributes."""
    with h5py.File(path, "w", libver=LIBVER) as target:
        write_release(source, target, dtype, set(kept))
        target.attrs[DTYPE_ATTR] = dtype
        target.attrs[KEPT_ATTR] = json.dumps(kept)
        target.attrs[CHECKSUM_ATTR] = checksum(target)


def write_weights(model: keras.Model, path: str, dtype: str, keep_float32: Optional[str] = None,
                  measure: bool = True) -> HalfWeightsReport:
    """`save_weights` after its checks (`check_arguments`, `check_destination`).

    Args:
        model: The model whose weights are written.
        path: The `.weights.h5` file to write (atomically).
        dtype: `"bfloat16"` or `"float16"`.
        keep_float32: `"overflow"`: variables float16 cannot hold stay float32.
        measure: Also write the same file in float32 (in a scratch folder) to size it.

    Returns:
        A `HalfWeightsReport`; its `float32_bytes` is 0 without `measure`.

    Raises:
        WeightsFileError: a variable float16 cannot hold, without `keep_float32`.
    """
    with tempfile.TemporaryDirectory() as scratch:
        with h5py.File(_keras_weights(model, scratch), "r") as source:
            names = variables_of(model, source)
            stored = datasets(source)
            kept: dict[str, str] = {}
            if dtype == "float16":
                problems = {n: float16_problem(d[()]) for n, d in stored if d.dtype == np.float32}
                for name in _in_model_order(model, names, [n for n, p in problems.items() if p]):
                    if keep_float32 is None:
                        raise WeightsFileError(
                            f"variable {_label(names, name)!r} cannot be written in float16: "
                            f"{problems[name]}; pass keep_float32='overflow' to keep it in "
                            "float32, or use bfloat16")
                    kept[name] = f"{_label(names, name)}: {problems[name]}"
            with atomic_path(path, ".weights.h5") as tmp:
                _write(source, tmp, dtype, kept)
                size = os.path.getsize(tmp)
            float32_bytes = 0
            if measure:
                float32 = os.path.join(scratch, "release.float32.weights.h5")
                _write(source, float32, "float32", {})
                float32_bytes = os.path.getsize(float32)
    return HalfWeightsReport(str(path), dtype, size, float32_bytes, len(stored),
                             {_label(names, k): v for k, v in kept.items()})


def save_weights(model: keras.Model, path: str, dtype: str = "bfloat16", *,
                 keep_float32: Optional[str] = None) -> HalfWeightsReport:
    """Writes `model`'s variables in 16 bits (atomically): release weights at half the size.

    Args:
        model: A built Keras model under any policy.
        path: The file to write; must end in `.weights.h5` (Keras' weights format).
        dtype: `bfloat16` (float32's range, 8 bits of precision) or `float16` (11 bits,
            values within 6.1e-5 .. 65504); `float32` writes the same file unrounded.
        keep_float32: float16 only: `"overflow"` keeps a variable float16 cannot hold
            in float32 in the same file; None (default) refuses it.

    Returns:
        A `HalfWeightsReport` (size, the float32 size, the variables kept in float32).

    Raises:
        WeightsFileError: a bad `path`, `dtype` or `keep_float32`, or (float16, without
            `keep_float32`) a variable float16 cannot hold, named. Nothing is written then;
            an earlier file at `path` is left as it was until the new one is complete.

    Example:
    >>> tfmp.save_weights(model, "release.weights.h5", "bfloat16").size_ratio
    0.5...
    """
    check_arguments(dtype, keep_float32, float32=True)
    check_destination(path, ".weights.h5")
    return write_weights(model, path, dtype, keep_float32)


def _shapes(f: h5py.File) -> dict[str, tuple[int, ...]]:
    return {name: tuple(data.shape) for name, data in datasets(f)}


def load_weights(model: keras.Model, path: str) -> str:
    """Loads a file `save_weights` wrote (or Keras' own `.weights.h5`) into `model`, checked.

    The file is copied aside and the copy checked and loaded (a file replaced meanwhile is
    not read half-checked): its checksum, then its variables against what `model` holds
    (their count and shapes, in the model's order): a file written for another
    architecture, or a damaged one, is refused in one line naming the first variable that
    does not fit, and nothing is loaded. Works under any policy: each variable receives the
    16-bit value as float32 (or the float32 value the file kept). A compiled model's
    optimizer is left as it is.

    Args:
        model: A built model of the architecture the file was written from.
        path: The `.weights.h5` file.

    Returns:
        The dtype the file stores its weights in (`bfloat16`, `float16`, or `float32` for
        one Keras wrote).

    Raises:
        WeightsFileError: a path not ending in `.weights.h5`, an unbuilt model, a missing or
            unreadable file, a checksum that does not match, or a variable missing, extra or
            of another shape (named). `model` is unchanged then.

    Example:
    >>> tfmp.load_weights(model, "release.weights.h5")
    'bfloat16'
    """
    if not str(path).endswith(".weights.h5"):
        raise WeightsFileError(f"{path!r} must end in .weights.h5 (Keras' weights format)")
    if not model.built:
        raise WeightsFileError(f"{model.name!r} is not built: call it on a batch or give it an "
                               "Input before loading weights")
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path!r}: no such file")
    with tempfile.TemporaryDirectory() as scratch:
        copy = os.path.join(scratch, "loaded.weights.h5")
        shutil.copyfile(path, copy)
        try:
            with h5py.File(copy, "r") as f:
                dtype = str(f.attrs.get(DTYPE_ATTR, "float32"))
                stored = f.attrs.get(CHECKSUM_ATTR)
                if stored is not None and str(stored) != checksum(f):
                    raise WeightsFileError(f"{path!r} is damaged: its checksum does not match "
                                           "what it holds")
                found = _shapes(f)
        except OSError as e:
            raise WeightsFileError(f"{path!r} is not a readable weights file "
                                   f"({first_line(e)})") from None
        with h5py.File(_keras_weights(model, scratch), "r") as reference:
            expected = _shapes(reference)
            names = variables_of(model, reference)
            for name in _in_model_order(model, names, list(expected)):
                if found.get(name) != expected[name]:
                    what = ("missing" if name not in found else
                            f"of shape {found[name]} where the model has {expected[name]}")
                    raise WeightsFileError(
                        f"{path!r} does not fit {model.name!r}: variable "
                        f"{_label(names, name)!r} is {what} (written for another architecture?)")
            extra = sorted(set(found) - set(expected))
            if extra:
                raise WeightsFileError(f"{path!r} does not fit {model.name!r}: it holds "
                                       f"{len(extra)} variable(s) the model has not, first "
                                       f"{extra[0]!r}")
        with warnings.catch_warnings():  # a compiled model: its optimizer is left as it is
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(copy)
    return dtype
