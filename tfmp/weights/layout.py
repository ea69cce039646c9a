"""Keras' `.weights.h5` layout, read and rewritten in 16 bits: the file-level half of `tfmp.weights`.

Keras writes each layer's own variables (`_trainable_variables + _non_trainable_variables`,
in that order) as datasets `0`, `1`, ... of a `vars` group whose `name` attribute is the
layer's name; a nested model or a custom layer's sublayer sits under its parent's group.
A compiled model's optimizer sits in an `optimizer` group, which release weights leave out.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import h5py
import keras
import ml_dtypes
import numpy as np

from tfmp import _compat
from tfmp.precision.ranges import FLOAT16_TINY, HALF_MAX
from tfmp.rewrite.classify import iter_layers

OPTIMIZER_GROUP = "optimizer"  # where Keras' save_weights puts a compiled model's optimizer
VARS_GROUP = "vars"
FLOAT16_MAX = HALF_MAX["float16"]
FLOAT16_FLUSH = FLOAT16_TINY / 2  # float16 rounds a magnitude at or below this to zero
# Files readable by HDF5 1.8 and newer (its compact object headers: smaller files).
LIBVER = ("v108", "v110")


def bfloat16_type() -> Any:
    """The HDF5 type of bfloat16: IEEE float32's layout cut to 16 bits (sign bit 15, 8
    exponent bits at bit 7 with bias 127, 7 mantissa bits)."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(15, 7, 8, 0, 7)  # sign position, exponent position and size, mantissa
    t.set_offset(0)
    t.set_precision(16)
    t.set_size(2)
    t.set_ebias(127)
    return t


def released(name: str) -> bool:
    """Whether a path of Keras' weights file belongs in release weights: not an optimizer's
    state (the model's, or a nested compiled model's), which resuming needs and a release
    does not."""
    return OPTIMIZER_GROUP not in name.split("/")


def datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    """The datasets of the model's own variables, in the file's order."""
    found: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda name, obj: found.append((name, obj))
                 if isinstance(obj, h5py.Dataset) and released(name) else None)
    return found


def variables_of(model: keras.Model, f: h5py.File) -> dict[str, Any]:
    """The variable each dataset of a file Keras wrote from `model` holds, placed by the file's
    structure: the layer names on the `vars` groups of the dataset's ancestors (a nested
    model, a custom layer) make its path in the model, then the variable's index in its
    layer's own variables. A dataset that cannot be placed is left out."""
    layers = dict(iter_layers(model))
    by_name: dict[str, list[Any]] = {}
    for layer in layers.values():
        by_name.setdefault(layer.name, []).append(layer)
    found: dict[str, Any] = {}
    for name, _ in datasets(f):
        parts = name.split("/")
        if len(parts) < 2 or parts[-2] != VARS_GROUP or not parts[-1].isdigit():
            continue
        groups = parts[:-2]
        chain = [str(f["/".join(groups[:k] + [VARS_GROUP])].attrs.get("name", ""))
                 for k in range(1, len(groups) + 1)
                 if "/".join(groups[:k] + [VARS_GROUP]) in f]
        if not groups:
            layer = model
        else:
            same_name = by_name.get(chain[-1], []) if chain else []
            layer = layers.get("/".join(chain)) or (same_name[0] if len(same_name) == 1 else None)
        own = _compat.own_variables(layer) if layer is not None else []
        if int(parts[-1]) < len(own):
            found[name] = own[int(parts[-1])]
    return found


def float16_problem(array: np.ndarray) -> Optional[str]:
    """Why float16 cannot hold `array` (None: it can).

    Args:
        array: A float32 array.

    Returns:
        One phrase, or None.
    """
    finite = array[np.isfinite(array)]
    largest = float(np.abs(finite).max()) if finite.size else 0.0
    if largest > FLOAT16_MAX:
        return f"values up to {largest:.4g}, past float16's 65504"
    nonzero = np.abs(finite[finite != 0])
    if nonzero.size and float(nonzero.max()) <= FLOAT16_FLUSH:
        return f"every nonzero value is at most {FLOAT16_FLUSH:.3g}: float16 makes it all zeros"
    return None


def checksum(f: h5py.File) -> str:
    """SHA-256 of every dataset's name, stored type, shape, attributes and values (as read)."""
    digest = hashlib.sha256()
    for name, data in sorted(datasets(f)):
        kind = data.id.get_type()
        digest.update(f"{name}|{kind.get_class()}|{kind.get_size()}|{data.shape}|".encode())
        digest.update(repr(sorted((k, str(v)) for k, v in data.attrs.items())).encode())
        digest.update(np.ascontiguousarray(data[()]).tobytes())
    return digest.hexdigest()


def _store(target: h5py.File, name: str, array: np.ndarray, dtype: str, keep: bool) -> None:
    if array.dtype != np.float32 or keep or dtype == "float32":
        target.create_dataset(name, data=array)  # ints, float64, kept ones: as they are
    elif dtype == "float16":
        target.create_dataset(name, data=array.astype(np.float16))
    else:  # the bfloat16 bits (ml_dtypes rounds to nearest even), stored as bfloat16_type
        bits = np.ascontiguousarray(array.astype(ml_dtypes.bfloat16)).view(np.uint16)
        kind = bfloat16_type()
        space = (h5py.h5s.create_simple(array.shape) if array.shape
                 else h5py.h5s.create(h5py.h5s.SCALAR))
        parent = target.require_group(os.path.dirname(name)) if "/" in name else target
        stored = h5py.h5d.create(parent.id, os.path.basename(name).encode(), kind, space)
        stored.write(h5py.h5s.ALL, h5py.h5s.ALL, bits, mtype=kind)


def write_release(source: h5py.File, target: h5py.File, dtype: str, keep: set[str]) -> None:
    """Copies `source` (a file Keras wrote) into `target`: the released groups and datasets
    with their attributes, float32 arrays in `dtype` except the names in `keep`."""
    for key, value in source.attrs.items():
        target.attrs[key] = value

    def copy(name: str, obj: Any) -> None:
        if not released(name):
            return
        if isinstance(obj, h5py.Group):
            group = target.require_group(name)
        else:
            _store(target, name, obj[()], dtype, name in keep)
            group = target[name]
        for key, value in obj.attrs.items():
            group.attrs[key] = value

    source.visititems(copy)


def optimizer_variables(f: h5py.File) -> int:
    """How many variables of a compiled model's optimizer a file Keras wrote holds (0: none).

    Args:
        f: A `.weights.h5` file of a model, open.

    Returns:
        The datasets of its `optimizer/vars` group: one per variable of the model's
        `optimizer.variables` (a loss-scale optimizer's include those of the one it wraps).
    """
    group = f.get(f"{OPTIMIZER_GROUP}/{VARS_GROUP}")
    return len(group) if isinstance(group, h5py.Group) else 0
