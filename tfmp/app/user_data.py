"""The user's own data for the training job: arrays in an `.npz` file, or a function returning
a `tf.data.Dataset` (`--data=package.module:function`), which may read TFRecord files or
anything else tf.data reads.

A data function is called as `fn(batch_size=..., input_context=...)` (each argument only if it
takes it): `batch_size` is the global batch size; `input_context` is None, except in a
multi-worker run, where it is each worker's `tf.distribute.InputContext` and the function
returns that worker's shard batched per replica (TensorFlow's
`distribute_datasets_from_function` recipe). It returns a batched dataset of `(x, y)` or
`(x, y, sample_weight)`, or a `(train, eval)` pair (eval may be None).

tools/compare and tools/export read `--data` (alias `--dataset`) the same way, for a model
they load (`data_flag`, `for_model`).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Optional, Union

import numpy as np
import tensorflow as tf
from absl import logging

from tfmp._compat import compile_arguments
from tfmp._messages import first_line
from tfmp.app.compiling import check_fit, first_batch_through
from tfmp.app.data import Data, DatasetError, batched, check_fits, input_kind, load
from tfmp.app.sources import SourceError, import_callable, is_callable_spec

NPZ_KEYS = ("x", "y", "x_eval", "y_eval", "sample_weight")


def from_npz(path: str, batch_size: int, seed: int = 0) -> Data:
    """Arrays `x`, `y` (optional `x_eval`, `y_eval`, `sample_weight`) from an `.npz` file.

    Integer labels give the number of classes (largest label + 1); integer inputs the
    vocabulary size (largest id + 1): what a reference model is built with.

    Args:
        path: The file.
        batch_size: The global batch size.
        seed: Seeds the training order (as the synthetic task's).

    Returns:
        `Data`: training batches shuffled in every pass; no evaluation without `x_eval`.

    Raises:
        DatasetError: a missing or unreadable file, missing or unknown arrays, object arrays,
            lengths that differ.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as e:  # missing, not a zip, object arrays (pickled)
        raise DatasetError(f"--data={path}: cannot read it as .npz arrays ({first_line(e)})") from None
    unknown = sorted(set(arrays) - set(NPZ_KEYS))
    if "x" not in arrays or "y" not in arrays or unknown:
        raise DatasetError(f"--data={path} holds {sorted(arrays)}: give arrays x and y (and "
                           "optionally x_eval, y_eval, sample_weight), nothing else")
    if ("x_eval" in arrays) != ("y_eval" in arrays):
        raise DatasetError(f"--data={path}: x_eval and y_eval come together")
    train = [arrays[k] for k in ("x", "y", "sample_weight") if k in arrays]
    _same_length(path, train, "x, y" + (", sample_weight" if len(train) == 3 else ""))
    evaluation = None
    if "x_eval" in arrays:
        pair = [arrays["x_eval"], arrays["y_eval"]]
        _same_length(path, pair, "x_eval, y_eval")
        evaluation = batched(tf.data.Dataset.from_tensor_slices(tuple(pair)), batch_size)
    x, y = train[0], train[1]
    labels = [y] + ([arrays["y_eval"]] if evaluation is not None else [])
    classes = (max(int(a.max()) for a in labels if a.size) + 1
               if y.dtype.kind in "iu" and y.size else None)
    vocab = int(x.max()) + 1 if x.dtype.kind in "iu" and x.size else None
    if len(x) < batch_size:
        raise DatasetError(f"--data={path} has {len(x)} training examples, fewer than "
                           f"--batch_size={batch_size}")
    ds = tf.data.Dataset.from_tensor_slices(tuple(train))
    return Data(batched(ds, batch_size, train=True, seed=seed), evaluation, x.shape[1:], classes,
                vocab, len(x), os.path.basename(path))


def _same_length(path: str, arrays: list[np.ndarray], names: str) -> None:
    lengths = [len(a) if a.ndim else 0 for a in arrays]
    if len(set(lengths)) > 1 or not lengths[0]:
        raise DatasetError(f"--data={path}: {names} must have the same, non-zero number of "
                           f"examples; they have {lengths}")


def from_function(spec: Union[str, Callable[..., Any]], batch_size: int,
                  several_workers: bool = False) -> Data:
    """The datasets a data function returns (see the module's docstring).

    Args:
        spec: `package.module:function`, or the function.
        batch_size: The global batch size it is given.
        several_workers: Also give `Data.per_worker`, calling the function with each worker's
            input context (when it takes one).

    Returns:
        `Data`: the training dataset repeated (`steps_per_pass`: its batches, when known).

    Raises:
        DatasetError: it does not import, fails, or returns no dataset of `(x, y)` or
            `(x, y, sample_weight)`, or an empty one.
    """
    if callable(spec):  # a binary's own function: no --data flag to name
        fn, spec = spec, f"{spec.__module__}:{getattr(spec, '__qualname__', 'data')}"
        what = f"the data function {spec}"
    else:
        what = f"--data={spec}"
        try:
            fn = import_callable(spec, "data")
        except SourceError as e:
            raise DatasetError(str(e)) from None
    train, evaluation = _call(fn, what, batch_size, None)
    steps = int(train.cardinality())
    for which, ds in (("training", train), ("evaluation", evaluation)):
        if ds is not None and int(ds.cardinality()) == 0:
            raise DatasetError(f"{what} returned an empty {which} dataset")
    x_spec = train.element_spec[0]
    shape = tuple(x_spec.shape[1:]) if isinstance(x_spec, tf.TensorSpec) else None
    per_worker = None
    if several_workers and "input_context" in _parameters(fn):
        per_worker = lambda context: _repeat(_call(fn, what, batch_size, context)[0])  # noqa: E731
    return Data(_repeat(train), evaluation, shape, None, None, None, spec,
                steps_per_pass=steps if steps > 0 else None, per_worker=per_worker)


def _parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {"batch_size"}
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return {"batch_size", "input_context"}
    return {p.name for p in params}


def _call(fn: Callable[..., Any], what: str, batch_size: int,
          context: Optional[tf.distribute.InputContext]) -> tuple[tf.data.Dataset, Any]:
    names = _parameters(fn)
    kwargs = {k: v for k, v in (("batch_size", batch_size), ("input_context", context))
              if k in names}
    try:
        result = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 (the user's code may raise anything)
        raise DatasetError(f"{what} failed: {first_line(e, typed=True)}") from None
    train, evaluation = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    for which, ds in (("training", train), ("evaluation", evaluation)):
        if which == "evaluation" and ds is None:
            continue
        if not isinstance(ds, tf.data.Dataset):
            raise DatasetError(f"{what} returned a {type(ds).__name__} as its {which} "
                               "data: return a tf.data.Dataset, or a (train, eval) pair of them")
        element = ds.element_spec
        if not isinstance(element, tuple) or len(element) not in (2, 3):
            raise DatasetError(f"{what}: its {which} dataset yields {_describe(element)}; "
                               "yield (x, y) or (x, y, sample_weight) batches")
    return train, evaluation


def _describe(element: Any) -> str:
    if isinstance(element, tuple):
        return f"tuples of {len(element)}"
    return type(element).__name__ if not isinstance(element, tf.TensorSpec) else "single tensors"


def _repeat(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds if ds.cardinality() == tf.data.INFINITE_CARDINALITY else ds.repeat()


def load_data(value: str, kind: Optional[str], batch_size: int, data_dir: Optional[str] = None,
              seed: int = 0, several_workers: bool = False,
              splits: tuple[str, Optional[str]] = ("train", None)) -> Data:
    """What `--data` names: `synthetic`, a tensorflow-datasets name, an `.npz` file, or a
    `package.module:function`.

    Args:
        value: The flag's value.
        kind: The model's input kind (`tfmp.app.data.INPUT_KINDS`): what synthetic data and
            tensorflow-datasets' preprocessing make.
        batch_size: The global batch size.
        data_dir: tensorflow-datasets' data directory.
        seed: Seeds the training order of synthetic, tensorflow-datasets and `.npz` data.
        several_workers: See `from_function`.
        splits: tensorflow-datasets' `(train, eval)` splits (`tfmp.app.data.load`).

    Returns:
        The `Data`.

    Raises:
        DatasetError: in one line, whatever is wrong with it.
    """
    if value.endswith(".npz"):
        return from_npz(value, batch_size, seed)
    if is_callable_spec(value):
        return from_function(value, batch_size, several_workers)
    return load(value, kind, batch_size, data_dir, seed, splits)


def is_user_data(value: str) -> bool:
    """Whether `--data` names the user's own data (an `.npz` file or a data function), which
    is not made for the model's input kind as synthetic and tensorflow-datasets data are."""
    return value.endswith(".npz") or is_callable_spec(value)


def data_flag(data: Optional[str], dataset: Optional[str]) -> Optional[str]:
    """`--data`, or its alias `--dataset` (the one given; None when neither is).

    Args:
        data: `--data`'s value.
        dataset: `--dataset`'s value.

    Returns:
        The value given.

    Raises:
        DatasetError: both are given and disagree.
    """
    if data and dataset and data != dataset:
        raise DatasetError(f"--data={data} and --dataset={dataset} disagree; give one of them")
    return data or dataset


def for_model(value: str, model: Any, batch_size: int, data_dir: Optional[str] = None,
              seed: int = 0) -> Data:
    """What `--data` names, for a model a tool loaded, checked against it: the user's data
    through the model (`check_model`), synthetic or tensorflow-datasets data by shape.

    Args:
        value: The flag's value (`load_data`).
        model: The model (synthetic and tensorflow-datasets data are made for its input kind).
        batch_size: The global batch size.
        data_dir: tensorflow-datasets' data directory.
        seed: Seeds the training order.

    Returns:
        The `Data`.

    Raises:
        DatasetError: in one line, what is wrong with the data, or what does not fit the model.
    """
    kind = None if is_user_data(value) else input_kind(model)
    d = load_data(value, kind, batch_size, data_dir, seed)
    if kind is None:  # the user's data: through the model; else made for its kind of input
        check_model(model, d)
    else:
        check_fits(model, d)
    return d


def check_model(model: Any, data: Data) -> None:
    """The data against a built model: its examples' shape (`check_fits`), then its first
    batch through the model; for a compiled model also its labels and loss
    (`tfmp.app.compiling.check_fit`).

    Args:
        model: The model.
        data: The data.

    Raises:
        DatasetError: in one line, what does not fit.
    """
    check_fits(model, data)
    if compile_arguments(model).get("loss") is not None:
        check_fit(model, data)
    else:
        first_batch_through(model, data)


def unweighted(data: Data) -> tf.data.Dataset:
    """The training batches as `(x, y)`: a dataset of `(x, y, sample_weight)` batches without
    its weights (said in a log line), for what trains on `(x, y)` only (`compare_precision`).

    Args:
        data: The data.

    Returns:
        `data.train`, or its `(x, y)`.
    """
    if len(data.train.element_spec) != 3:
        return data.train
    logging.warning("%s has sample weights: left out (the policies are compared on the "
                    "unweighted loss)", data.name)
    return data.train.map(lambda x, y, w: (x, y))
