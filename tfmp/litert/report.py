"""What an export is measured by: the report of `tfmp.export` and its table (the gate: `gate`).

The Keras model and the exported one see the same evaluation batches: their
metric, the largest output difference against the same network computing in
float32 (the quantization error alone), and their latency per batch, measured
taking turns batch by batch after one warm-up batch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Iterable, Optional, Union

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmp.litert.runner import Runner
from tfmp.measure.stats import batches_phrase, quartiles
from tfmp.rewrite.tracing import first_input_spec

ARRAY_BATCH = 32  # examples per batch when data comes as arrays


class ExportError(ValueError):
    """A model or input that cannot be exported; the message is one line."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What one export produced and how it compares with the Keras model.

    Attributes:
        quantization: `float32` (not quantized), `float16`, `dynamic_int8` or `full_int8`.
        path: The LiteRT file written.
        size_bytes: Its size.
        float32_bytes: The model's weights as float32 (parameters x 4 bytes).
        float_ops: Ops left in float32 (full_int8: no int8 kernel), by op name.
        runtime: The interpreter evaluated with: `litert` or `tf` (tf.lite).
        model_policy: The policy the Keras model computed under.
        metric: Name of the metric (higher is better).
        keras_metric, exported_metric: The metric of the Keras model as given
            and of the exported model, on the same evaluation batches.
        max_abs_diff: Largest |exported output - output| of the same network
            computing in float32 (the quantization error alone).
        output_scale: Largest |output| of that float32 network.
        keras_ms, exported_ms: Median milliseconds per batch, measured taking
            turns batch by batch after one warm-up batch.
        latency_ratio: exported / Keras time per batch: median and quartiles.
        batches, batch_size: Evaluation batches and the size of the first.
    """

    quantization: str
    path: str
    size_bytes: int
    float32_bytes: int
    float_ops: dict[str, int]
    runtime: str
    model_policy: str
    metric: Optional[str] = None
    keras_metric: Optional[float] = None
    exported_metric: Optional[float] = None
    max_abs_diff: Optional[float] = None
    output_scale: Optional[float] = None
    keras_ms: Optional[float] = None
    exported_ms: Optional[float] = None
    latency_ratio: Optional[tuple[float, float, float]] = None
    batches: int = 0
    batch_size: int = 0

    @property
    def accuracy_drop(self) -> Optional[float]:
        """Keras metric minus exported metric (positive: the export lost accuracy)."""
        if self.keras_metric is None or self.exported_metric is None:
            return None
        return self.keras_metric - self.exported_metric

    @property
    def relative_diff(self) -> Optional[float]:
        """`max_abs_diff / output_scale`."""
        if self.max_abs_diff is None or not self.output_scale:
            return None
        return self.max_abs_diff / self.output_scale

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "accuracy_drop": self.accuracy_drop,
                "relative_diff": self.relative_diff,
                "size_ratio": self.size_bytes / max(self.float32_bytes, 1)}


def checked_batch(x: Any, model: keras.Model, what: str) -> np.ndarray:
    """`x` as an array of the model's input dtype, if its shape and kind of dtype fit.

    Args:
        x: A batch of inputs.
        model: The model whose input it must fit.
        what: What the batch is, for the message (`"calibration data"`).

    Returns:
        `x` as an array of the model's input dtype.

    Raises:
        ExportError: `x` is not a batch of the model's inputs (another shape,
            or floats for integer ids and the other way round).
    """
    spec = first_input_spec(model)
    want = spec.dtype.name
    known = bool(getattr(model, "inputs", None))  # a subclassed model's dtype is not recorded
    x = np.asarray(x)
    shape_ok = x.ndim == len(spec.shape) and all(
        d is None or d == s for d, s in zip(spec.shape[1:], x.shape[1:]))
    numeric = x.dtype.kind in ("i", "u", "f")
    kind_ok = numeric if not known else (
        x.dtype.kind in ("i", "u") if "int" in want else x.dtype.kind == "f")
    if not (shape_ok and kind_ok):
        hint = " (unbatched examples? batch them)" if x.ndim == len(spec.shape) - 1 else ""
        takes = f"{tuple(spec.shape)} {want}" if known else str(tuple(spec.shape))
        raise ExportError(f"{what} has batches of shape {x.shape} and dtype {x.dtype}; the model "
                          f"takes {takes}{hint}")
    return x.astype(want, copy=False) if known else x


def array_batches(arrays: Any, size: int = ARRAY_BATCH) -> list[Any]:
    """One array, or a tuple of arrays of one length (`(x, y)`), cut into batches of `size`.

    Args:
        arrays: An array, or a tuple of arrays with the same first dimension.
        size: Examples per batch (the last batch may be smaller).

    Returns:
        The batches (tuples of batches for a tuple).
    """
    if isinstance(arrays, tuple):
        return list(zip(*(array_batches(a, size) for a in arrays)))
    return [arrays[i:i + size] for i in range(0, len(arrays), size)]


def inputs_of(batch: Any) -> Any:
    """The inputs of a batch: `x` of `(x, y[, ...])`, or the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def eval_batches(eval_data: Any) -> Any:
    """`eval_data` as batches: a tuple of two arrays `(x, y)` is cut into `ARRAY_BATCH`-example
    batches; a dataset or an iterable of batches is returned as it is.

    Args:
        eval_data: `(x, y)` arrays, a `tf.data.Dataset` or an iterable of batches.

    Returns:
        Something to iterate batches `(x, y)` from.
    """
    if isinstance(eval_data, tuple) and all(isinstance(a, np.ndarray) for a in eval_data):
        return array_batches(eval_data)
    return eval_data


def log_evaluation(quantization: str, eval_data: Any, steps: Optional[int]) -> None:
    """The progress line of an export's evaluation: `evaluating <mode> on <n> batches`."""
    logging.info("tfmp.export: evaluating %s on %s", quantization,
                 batches_phrase(eval_batches(eval_data), steps))


def _metric(metric: Union[str, Any]) -> keras.metrics.Metric:
    """A fresh metric object: `keras.metrics.get` hands back a given object itself, and
    the Keras and the exported model must not add to one state (nor to the caller's)."""
    found = keras.metrics.get(metric)
    if isinstance(found, keras.metrics.Metric):
        return keras.metrics.deserialize(keras.metrics.serialize(found))
    return keras.metrics.MeanMetricWrapper(found)


class Inference:
    """`model(x, training=False)` as one `tf.function`: traced on its first batch, then
    reused by every export the model is compared with.

    Args:
        model: A built Keras model.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._call = tf.function(lambda x: model(x, training=False))

    def __call__(self, x: Any) -> Any:
        return self._call(x)


def evaluate(keras_model: Inference, reference: Inference, runner: Any, data: Iterable[Any],
             steps: Optional[int], metric: Union[str, Any]) -> dict[str, Any]:
    """The evaluation fields of an `ExportReport`.

    Args:
        keras_model: The Keras model as given (its metric and latency).
        reference: The same network computing in float32 (the output difference);
            `keras_model` itself when the model computes in float32.
        runner: The exported model (a `Runner`, or anything called like one).
        data: Batches `(x, y[, ...])`; `steps` of them (None: all).
        metric: A Keras metric name or object, higher is better.

    Raises:
        ExportError: no batch, a batch without labels, or inputs that do not fit.
    """
    # A float32 model is its own reference: its outputs are not computed twice.
    reference_fn = None if reference is keras_model else reference
    keras_metric, exported_metric = _metric(metric), _metric(metric)
    keras_ms, exported_ms, diff, scale, batches, batch_size = [], [], 0.0, 0.0, 0, 0
    for i, batch in enumerate(data):
        if steps is not None and i >= steps:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ExportError("evaluation data must be batches (x, y): labels are needed for "
                              f"the metric; got {type(batch).__name__}")
        x, y = batch[0], batch[1]  # sample weights, if any, are not used
        x = checked_batch(x, keras_model.model, "evaluation data")
        if i == 0:  # warm-up: traces the functions (once per model), allocates the interpreter
            keras_model(x), runner(x)
            batch_size = len(x)
        t0 = time.perf_counter()
        out = keras_model(x).numpy()
        t1 = time.perf_counter()
        exported = runner(x)
        t2 = time.perf_counter()
        if i > 0:
            keras_ms.append(1e3 * (t1 - t0))
            exported_ms.append(1e3 * (t2 - t1))
        full = out if reference_fn is None else reference_fn(x).numpy()
        diff = max(diff, float(np.abs(exported - full).max()))
        scale = max(scale, float(np.abs(full).max()))
        keras_metric.update_state(y, out)
        exported_metric.update_state(y, exported)
        batches += 1
    if not batches:
        raise ExportError("evaluation data is empty")
    timed = bool(keras_ms)
    return dict(
        metric=keras_metric.name, keras_metric=float(keras_metric.result()),
        exported_metric=float(exported_metric.result()), max_abs_diff=diff, output_scale=scale,
        keras_ms=statistics.median(keras_ms) if timed else None,
        exported_ms=statistics.median(exported_ms) if timed else None,
        latency_ratio=quartiles([e / k for e, k in zip(exported_ms, keras_ms)]) if timed else None,
        batches=batches, batch_size=batch_size)


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def format_reports(reports: Iterable[ExportReport]) -> str:
    """A markdown table: one row per export.

    Args:
        reports: `ExportReport`s.

    Returns:
        The table.
    """
    rows = ["| export | size (vs float32 weights) | metric: Keras -> exported (drop) "
            "| max abs diff (relative) | ms per batch: Keras / exported (ratio, quartiles) "
            "| left in float32 (ops; keras_*: variables) |", "|---|---|---|---|---|---|"]
    for r in reports:
        size = f"{_kb(r.size_bytes)} ({r.size_bytes / max(r.float32_bytes, 1):.2f}x)"
        metric = diff = latency = "not evaluated"
        if r.keras_metric is not None:
            metric = (f"{r.metric} {r.keras_metric:.4f} -> {r.exported_metric:.4f} "
                      f"({r.accuracy_drop:+.4f})")
            diff = f"{r.max_abs_diff:.3g} ({100 * (r.relative_diff or 0):.2g}%)"
        if r.latency_ratio is not None:
            lo, med, hi = r.latency_ratio
            latency = (f"{r.keras_ms:.2f} / {r.exported_ms:.2f} ({med:.2f}x, {lo:.2f}-{hi:.2f}; "
                       f"batch {r.batch_size}, {r.runtime})")
        floats = ", ".join(f"{op} x{n}" for op, n in sorted(r.float_ops.items())) or "none"
        rows.append(f"| {r.quantization} | {size} | {metric} | {diff} | {latency} | {floats} |")
    return "\n".join(rows)
