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
import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Optional

import h5py
import keras
import ml_dtypes
import numpy as np

from tfmp.atomic import atomic_path

DTYPES = ("bfloat16", "float16")
FLOAT16_MAX = 65504.0
FLOAT16_TINY = 2.0 ** -24  # below half of it a value rounds to zero
DTYPE_ATTR = "tfmp_half_dtype"
KEPT_ATTR = "tfmp_kept_float32"
CHECKSUM_ATTR = "tfmp_sha256"
KEEP_CHOICES = (None, "overflow")
OPTIMIZER_GROUP = "optimizer"  # where Keras' save_weights puts a compiled model's optimizer


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


def _bfloat16_type() -> Any:
    """The HDF5 type of bfloat16: IEEE float32's layout cut to 16 bits."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(15, 7, 8, 0, 7)  # sign position, exponent position and size, mantissa
    t.set_offset(0)
    t.set_precision(16)
    t.set_size(2)
    t.set_ebias(127)
    return t


def _keras_weights(model: keras.Model, directory: str) -> str:
    """Keras' own float32 `.weights.h5` of `model`, in `directory`."""
    path = os.path.join(directory, "float32.weights.h5")
    model.save_weights(path)
    return path


def _released(name: str) -> bool:
    """Whether a path of Keras' weights file is part of release weights: not the optimizer's
    state, which Keras' `save_weights` writes for a compiled model (resuming needs it; a
    release does not: `BackupAndRestore` keeps it in float32)."""
    return name.split("/")[0] != OPTIMIZER_GROUP


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    """The datasets of the model's own variables, in the file's order."""
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: found.append((name, obj))
                 if isinstance(obj, h5py.Dataset) and _released(name) else None)
    return found


def _variable_names(model: keras.Model, datasets: list[tuple[str, Any]]) -> dict[str, str]:
    """For each dataset of a file Keras wrote from `model`, the variable it holds (by value)."""
    values = [(v.path, np.asarray(v.numpy())) for v in model.weights]
    names = {}
    for name, data in datasets:
        array = np.asarray(data)
        for path, value in values:
            if value.shape == array.shape and value.dtype == array.dtype and np.array_equal(
                    value, array, equal_nan=True):
                names[name] = path
                break
    return names


def _problem(array: np.ndarray) -> Optional[str]:
    """Why float16 cannot hold `array` (None: it can)."""
    finite = array[np.isfinite(array)]
    largest = float(np.abs(finite).max()) if finite.size else 0.0
    if largest > FLOAT16_MAX:
        return f"values up to {largest:.4g}, past float16's 65504"
    nonzero = np.abs(finite[finite != 0])
    if nonzero.size and float(nonzero.max()) < FLOAT16_TINY / 2:
        return f"every nonzero value is below {FLOAT16_TINY / 2:.3g}: float16 makes it all zeros"
    return None


def _checksum(f: h5py.File) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(_datasets(f)):
        digest.update(name.encode())
        digest.update(str(data.shape).encode())
        digest.update(np.ascontiguousarray(data[()]).tobytes())
    return digest.hexdigest()


def _write_half(source: h5py.File, target: h5py.File, dtype: str, keep: set[str]) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value

    def copy(name: str, obj: Any) -> None:
        if not _released(name):
            return
        if isinstance(obj, h5py.Group):
            group = target.require_group(name)
            for key, value in obj.attrs.items():
                group.attrs[key] = value
            return
        array = obj[()]
        if array.dtype != np.float32 or name in keep or dtype == "float32":
            target.create_dataset(name, data=array)
        elif dtype == "float16":
            target.create_dataset(name, data=array.astype(np.float16))
        else:
            bits = np.ascontiguousarray(array.astype(ml_dtypes.bfloat16)).view(np.uint16)
            kind = _bfloat16_type()
            space = h5py.h5s.create_simple(array.shape) if array.shape else h5py.h5s.create(
                h5py.h5s.SCALAR)
            parent = target.require_group(os.path.dirname(name)) if os.path.dirname(name) else target
            stored = h5py.h5d.create(parent.id, os.path.basename(name).encode(), kind, space)
            stored.write(h5py.h5s.ALL, h5py.h5s.ALL, bits, mtype=kind)
        for key, value in obj.attrs.items():
            target[name].attrs[key] = value

    source.visititems(copy)


def check_arguments(dtype: str, keep_float32: Optional[str], float32: bool = False) -> None:
    """Refuses a `dtype` or `keep_float32` `save_weights` does not take, in one line.

    Args:
        dtype: The dtype asked for.
        keep_float32: The `keep_float32` asked for.
        float32: Whether `float32` (an unrounded file) is accepted.

    Raises:
        WeightsFileError: either is not accepted.
    """
    if dtype not in DTYPES + (("float32",) if float32 else ()):
        raise WeightsFileError(f"dtype={dtype!r} is not accepted; use one of {', '.join(DTYPES)}")
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
    with h5py.File(path, "w", libver="latest") as target:
        _write_half(source, target, dtype, set(kept))
        target.attrs[DTYPE_ATTR] = dtype
        target.attrs[KEPT_ATTR] = json.dumps(kept)
        target.attrs[CHECKSUM_ATTR] = _checksum(target)


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
    with tempfile.TemporaryDirectory() as scratch:
        reference = _keras_weights(model, scratch)
        with h5py.File(reference, "r") as source:
            datasets = _datasets(source)
            names = _variable_names(model, datasets)
            kept: dict[str, str] = {}
            if dtype == "float16":
                for name, data in datasets:
                    array = data[()]
                    why = _problem(array) if array.dtype == np.float32 else None
                    if why is None:
                        continue
                    variable = names.get(name, name)
                    if keep_float32 is None:
                        raise WeightsFileError(
                            f"variable {variable!r} cannot be written in float16: {why}; pass "
                            "keep_float32='overflow' to keep it in float32, or use bfloat16")
                    kept[name] = f"{variable}: {why}"
            with atomic_path(path, ".weights.h5") as tmp:
                _write(source, tmp, dtype, kept)
                size = os.path.getsize(tmp)
            float32 = os.path.join(scratch, "release.float32.weights.h5")
            _write(source, float32, "float32", {})
            float32_bytes = os.path.getsize(float32)
    return HalfWeightsReport(str(path), dtype, size, float32_bytes, len(datasets),
                             {names.get(k, k): v for k, v in kept.items()})


def _layout(f: h5py.File) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(data.shape)) for name, data in _datasets(f)]


def load_weights(model: keras.Model, path: str) -> str:
    """Loads a file `save_weights` wrote (or Keras' own `.weights.h5`) into `model`, checked.

    The file's checksum is verified, and its variables are compared with what `model`
    holds (their count and shapes) before anything is loaded: a file written for
    another architecture, or a damaged one, is refused in one line naming the first
    variable that does not fit. Works under any policy; each variable receives the
    16-bit value as float32 (or the float32 value the file kept).

    Args:
        model: A built model of the architecture the file was written from.
        path: The `.weights.h5` file.

    Returns:
        The dtype the file stores its weights in (`bfloat16`, `float16`, or `float32` for
        one Keras wrote).

    Raises:
        WeightsFileError: a missing or unreadable file, a checksum that does not match,
            or a variable missing, extra or of another shape (named). `model` is unchanged.

    Example:
    >>> tfmp.load_weights(model, "release.weights.h5")
    'bfloat16'
    """
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path!r}: no such file")
    try:
        with h5py.File(path, "r") as f:
            dtype = str(f.attrs.get(DTYPE_ATTR, "float32"))
            stored = f.attrs.get(CHECKSUM_ATTR)
            if stored is not None and str(stored) != _checksum(f):
                raise WeightsFileError(f"{path!r} is damaged: its checksum does not match what "
                                       "it holds")
            found = dict(_layout(f))
    except OSError as e:
        raise WeightsFileError(f"{path!r} is not a readable weights file ({e})") from None
    with tempfile.TemporaryDirectory() as scratch:
        with h5py.File(_keras_weights(model, scratch), "r") as reference:
            datasets = _datasets(reference)
            expected = dict(_layout(reference))
            names = _variable_names(model, datasets)
            for name, shape in expected.items():
                if found.get(name) != shape:
                    what = ("missing" if name not in found else
                            f"of shape {found[name]} where the model has {shape}")
                    raise WeightsFileError(
                        f"{path!r} does not fit {model.name!r}: variable "
                        f"{names.get(name, name)!r} is {what} (written for another architecture?)")
            extra = sorted(set(found) - set(expected))
            if extra:
                raise WeightsFileError(f"{path!r} does not fit {model.name!r}: it holds {len(extra)} "
                                       f"variable(s) the model has not, first {extra[0]!r}")
    with warnings.catch_warnings():  # a compiled model: its optimizer is left as it is
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)
    return dtype
