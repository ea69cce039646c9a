"""`tfmp.export`: a trained Keras model to a quantized LiteRT (TFLite) file, with an accuracy report.

The usual way to deploy a model trained in mixed precision: quantize it after
training (float16 weights, or int8 calibrated on a representative dataset) and
check on held-out data that accuracy held. LiteRT's kernels compute in float32
or int8, not bfloat16, so the model is first rebuilt with every layer in float32
(the clone `tfmp.convert_policy` makes, weights bit-identical: variables are
float32 under every policy); tfmp's float32 layers and islands stay in the graph. Conversion
takes the two steps of Keras' own `model.export(format="litert")` (`tfmp.litert.converter`)
with TensorFlow's converter settings for each mode, restricted to LiteRT's builtin ops (no TF
Select ops, which LiteRT's standard runtime cannot run). `export_all` exports one model in
several modes: its float32 copy, its SavedModel and its traced inference are made once.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import os
from typing import Any, Iterable, Optional, Sequence, Union

import keras
import numpy as np
from absl import logging

from tfmp._messages import first_line
from tfmp.atomic import atomic_path, missing_folders
from tfmp.litert.converter import LITERT_MODES, SavedModelConverter, converter_settings
from tfmp.litert.release import KERAS_MODES, export_keras
from tfmp.litert.report import (ExportError, ExportReport, Inference, array_batches,
                                checked_batch, eval_batches, evaluate, inputs_of, log_evaluation)
from tfmp.litert.runner import RUNTIMES, Runner
from tfmp.precision import policy_scope
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite import run_model
from tfmp.rewrite.classify import iter_layers, model_policy
from tfmp.rewrite.cloning import clone_with_dtypes
from tfmp.rewrite.inplace import is_copyable, set_policies
from tfmp.rewrite.tracing import example_inputs

# The .keras file with 16-bit weights (tfmp.weights), judged beside the LiteRT files.
QUANTIZATIONS = LITERT_MODES + KERAS_MODES


def _half(layer: keras.layers.Layer) -> bool:
    return layer.compute_dtype in HALF_DTYPES


def float32_model(model: keras.Model) -> keras.Model:
    """`model` itself if every layer computes in float32, else a copy in which every layer does.

    A Sequential or Functional model is copied the way `tfmp.convert_policy` copies
    it; any other kind through Keras' own `clone_model` (from the model's config,
    as a `.keras` file is loaded), then its layers made float32 on the copy. The
    weights are copied bit for bit. Layers given a 16-bit dtype on purpose, which
    a conversion leaves as they are, are made float32 too.

    Args:
        model: A Keras model under any policy.

    Returns:
        `model`, or its float32 copy.

    Raises:
        ExportError: the model cannot be copied (one line).
    """
    if not any(_half(layer) for _, layer in iter_layers(model)) and not _half(model):
        return model
    try:
        if is_copyable(model):
            return clone_with_dtypes(model, lambda l: "float32" if _half(l) else None, _half)
        with policy_scope(model_policy(model)):  # what its __init__ made, then float32
            copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        set_policies(copy, lambda l: "float32" if _half(l) else None)
        copy(keras.tree.map_structure(  # Keras exports a model that was called once
            lambda s: np.zeros(s.shape, s.dtype.as_numpy_dtype), example_inputs(model)))
        return copy
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:
        raise ExportError(f"cannot copy {model.name!r} ({type(model).__name__}) in float32 for "
                          f"export: {first_line(e)}") from None


def _check_model(model: keras.Model) -> None:
    if not model.built:
        raise ExportError(f"model {model.name!r} is not built: call it on data or give it an Input")
    try:
        inputs = keras.tree.flatten(example_inputs(model))
        outputs = run_model(model, training=False).output_dtypes
    except Exception as e:  # noqa: BLE001 (a model's own code raises anything when traced)
        raise ExportError(f"cannot run {model.name!r} to export it: {first_line(e)}") from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"tfmp.export takes a model with one input and one output; "
                          f"{model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs")


def calibration_batches(data: Union[np.ndarray, Iterable[Any]], steps: int,
                        model: keras.Model) -> list[np.ndarray]:
    """Up to `steps` input batches from `data`, checked against the model's input.

    `data`: a `tf.data.Dataset` or iterable of batches (`x` or `(x, y)`), or one
    array of examples (cut into batches of `export_report.ARRAY_BATCH`).

    Args:
        data: The calibration data.
        steps: Batches to take.
        model: The model they must fit.

    Returns:
        The input batches, as arrays of the model's input dtype.

    Raises:
        ExportError: no batch, or a batch whose shape or kind of dtype (integer
            ids vs floats) is not the model's input's.
    """
    if steps < 1:
        raise ExportError(f"calibration_steps={steps} must be at least 1")
    if isinstance(data, np.ndarray):
        data = array_batches(data)
    batches = []
    for batch in data:
        batches.append(checked_batch(inputs_of(batch), model, "calibration data"))
        if len(batches) == steps:
            break
    if not batches:
        raise ExportError("calibration data is empty: full_int8 needs some of the training data")
    return batches


def check_quantization(quantization: str) -> None:
    """Refuses an unknown quantization mode before any work.

    Args:
        quantization: One of `QUANTIZATIONS`.

    Raises:
        ExportError: another name; the message lists the accepted ones.
    """
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r}; accepted: {', '.join(QUANTIZATIONS)}")


def export_filename(quantization: str) -> str:
    """The file name tools/export writes a mode to.

    Args:
        quantization: One of `QUANTIZATIONS`.

    Returns:
        `model_<mode>.tflite`, or `model_<mode>.keras` for the Keras modes.
    """
    return f"model_{quantization}.{'keras' if quantization in KERAS_MODES else 'tflite'}"


def _check_destination(path: str, quantization: str) -> None:
    """Refuses a path without the mode's suffix, or one whose directory is neither a writable
    directory nor creatable (its nearest existing ancestor is not a writable directory)."""
    suffix = ".keras" if quantization in KERAS_MODES else ".tflite"
    if not str(path).endswith(suffix):
        raise ExportError(f"export path {path!r} must end with {suffix} for {quantization}")
    existing = missing_folders(os.path.dirname(os.path.abspath(path)))[-1]
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path!r}: {existing!r} is not a writable directory")


def _make_directory(path: str) -> None:
    """Creates the directory of `path` (with its parents) if missing, as tools/export does."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {directory!r}: {e.strerror or e}") from None


class _Exports:
    """One model's exports. What they share is made once, on first use: the model's traced
    inference; for the LiteRT modes its float32 copy, that copy's traced inference and its
    SavedModel (removed on exit)."""

    def __init__(self, model: keras.Model, runtime: str) -> None:
        self.model, self.runtime = model, runtime
        self.inference = Inference(model)
        self._stack = contextlib.ExitStack()
        self._converter: Optional[SavedModelConverter] = None
        self._reference: Optional[Inference] = None

    def __enter__(self) -> "_Exports":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def litert(self) -> tuple[SavedModelConverter, Inference]:
        """The float32 copy's SavedModel (written) and that copy's inference, made once."""
        if self._converter is None:
            logging.info("tfmp.export: writing the SavedModel of %r in float32", self.model.name)
            network = float32_model(self.model)
            self._reference = self.inference if network is self.model else Inference(network)
            self._converter = self._stack.enter_context(SavedModelConverter(network))
        self._converter.write()
        return self._converter, self._reference

    def export(self, path: str, quantization: str, settings: Optional[dict[str, Any]],
               eval_data: Any, eval_steps: Optional[int], metric: Union[str, Any],
               int8_only: bool) -> ExportReport:
        """One mode: `settings` are its converter settings (None for the Keras modes)."""
        if quantization in KERAS_MODES:
            _make_directory(path)
            return export_keras(self.inference, path, quantization, eval_data=eval_data,
                                eval_steps=eval_steps, metric=metric)
        converter, reference = self.litert()
        logging.info("tfmp.export: converting %s", quantization)
        flatbuffer = converter.convert(settings)
        _make_directory(path)  # once the mode converted: a model LiteRT cannot run makes none
        with atomic_path(path, ".tflite") as tmp:
            with open(tmp, "wb") as f:
                f.write(flatbuffer)
            runner = Runner(tmp, self.runtime)
            float_ops = dict(runner.float_ops) if quantization == "full_int8" else {}
            if int8_only and float_ops:
                raise ExportError("full_int8 with int8_only: no int8 kernel for " + ", ".join(
                    f"{op} (x{n})" for op, n in sorted(float_ops.items())) + "; they would stay "
                    "float32")
            report = ExportReport(
                quantization=quantization, path=str(path), size_bytes=os.path.getsize(tmp),
                float32_bytes=4 * int(self.model.count_params()), float_ops=float_ops,
                runtime=runner.runtime, model_policy=model_policy(self.model))
            if eval_data is not None:  # before the file is in place: bad eval data writes nothing
                log_evaluation(quantization, eval_data, eval_steps)
                report = dataclasses.replace(report, **evaluate(
                    self.inference, reference, runner, eval_batches(eval_data), eval_steps, metric))
        return report


def _export_modes(model: keras.Model, destinations: Sequence[tuple[str, str]], *,
                  calibration_data: Any, calibration_steps: int, eval_data: Any,
                  eval_steps: Optional[int], metric: Union[str, Any], int8_only: bool,
                  runtime: str) -> list[ExportReport]:
    """`export` for each `(path, quantization)`, everything checked before any work."""
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; accepted: {', '.join(RUNTIMES)}")
    for path, quantization in destinations:
        check_quantization(quantization)
        _check_destination(path, quantization)
    _check_model(model)
    int8 = any(quantization == "full_int8" for _, quantization in destinations)
    calibration = (calibration_batches(calibration_data, calibration_steps, model)
                   if int8 and calibration_data is not None else None)
    settings = [None if quantization in KERAS_MODES else converter_settings(quantization, calibration)
                for _, quantization in destinations]  # full_int8 without calibration: refused
    with _Exports(model, runtime) as exports:
        if any(mode is not None for mode in settings):
            exports.litert()  # a model that cannot be copied or saved: before any file
        return [exports.export(path, quantization, mode_settings, eval_data, eval_steps, metric,
                               int8_only)
                for (path, quantization), mode_settings in zip(destinations, settings)]


def export(
    model: keras.Model,
    path: str,
    quantization: str = "float16",
    *,
    calibration_data: Union[np.ndarray, Iterable[Any], None] = None,
    calibration_steps: int = 10,
    eval_data: Optional[Iterable[Any]] = None,
    eval_steps: Optional[int] = None,
    metric: Union[str, Any] = "sparse_categorical_accuracy",
    int8_only: bool = False,
    runtime: str = "auto",
) -> ExportReport:
    """Writes `model` as a quantized LiteRT file (atomically) and reports on it.

    Args:
        model: A built Keras model with one input and one output, under any
            policy (a 16-bit one is rebuilt in float32 first).
        path: The `.tflite` file to write (`.keras` for the Keras modes); its directory
            is created (with its parents) if missing, once the model converted.
        quantization: `float32` (not quantized: the baseline to compare the
            others with), `float16` (weights in float16), `dynamic_int8` (weights in
            int8, activations quantized on the fly) or `full_int8` (weights and
            activations in int8, calibrated on `calibration_data`; the model's
            input and output stay float32 / integer ids); or `keras_bfloat16` /
            `keras_float16`: the `.keras` file with 16-bit release weights
            (`tfmp.litert.release`), loaded back and judged the same way.
        calibration_data: full_int8 only: a `tf.data.Dataset` or iterable of
            batches (`x` or `(x, y)`) drawn from the training data, or one
            array of examples.
        calibration_steps: Batches of `calibration_data` to use.
        eval_data: Batches `(x, y)` (a `tf.data.Dataset` or iterable) to compare
            the Keras and exported models on, or a tuple of two arrays.
        eval_steps: Batches of `eval_data` to use (default: all).
        metric: A Keras metric (name or object), higher is better.
        int8_only: full_int8: refuse a model in which some ops had no int8
            kernel and stay float32 (needed on integer-only accelerators).
        runtime: `auto` (LiteRT if installed, else tf.lite), `litert` or `tf`.

    Returns:
        An `ExportReport` (metric, output difference and latency fields set
        when `eval_data` is given).

    Raises:
        ExportError: a bad quantization name, runtime or destination, a model that is
            not single-input/single-output, calibration or evaluation data of
            the wrong shape or dtype, an op LiteRT has no kernel for (named),
            or with `int8_only` an op left in float32 (named). No file is
            written then (a missing directory made for it stays when the
            evaluation data does not fit or `int8_only` refuses).

    Example:
    >>> report = tfmp.export(model, "m.tflite", "full_int8", calibration_data=train_ds.take(10),
    ...                      eval_data=eval_ds)
    >>> report.accuracy_drop, report.size_bytes
    """
    return _export_modes(model, [(path, quantization)], calibration_data=calibration_data,
                         calibration_steps=calibration_steps, eval_data=eval_data,
                         eval_steps=eval_steps, metric=metric, int8_only=int8_only,
                         runtime=runtime)[0]


def export_all(
    model: keras.Model,
    output_dir: str,
    quantizations: Sequence[str] = QUANTIZATIONS,
    *,
    calibration_data: Union[np.ndarray, Iterable[Any], None] = None,
    calibration_steps: int = 10,
    eval_data: Optional[Iterable[Any]] = None,
    eval_steps: Optional[int] = None,
    metric: Union[str, Any] = "sparse_categorical_accuracy",
    int8_only: bool = False,
    runtime: str = "auto",
) -> list[ExportReport]:
    """`tfmp.export` in several modes, each to `output_dir/export_filename(mode)`.

    The same files and reports as one `tfmp.export` call per mode, in less time: the
    model's float32 copy, its SavedModel and the traced Keras inference the reports
    compare with are made once for all the modes, not once per mode.

    Args:
        model: As for `tfmp.export`.
        output_dir: A writable directory; created (with its parents) if missing, once
            the first mode converted.
        quantizations: Modes, in the order they are exported (`QUANTIZATIONS`), or one mode.
        calibration_data, calibration_steps, eval_steps, metric, int8_only, runtime: As
            for `tfmp.export`.
        eval_data: As for `tfmp.export`, read once per mode: a `tf.data.Dataset`, a list
            of batches or a tuple of two arrays, not a one-shot iterator.

    Returns:
        One `ExportReport` per mode, in order.

    Raises:
        ExportError: as `tfmp.export`. Refused before anything is written: an unknown or
            repeated mode, a directory that can be neither written nor created, full_int8
            without calibration data or with calibration data that does not fit, a one-shot
            `eval_data` iterator, a model that is not single-input/single-output or cannot be
            copied in float32 and saved. A mode that fails later (an op LiteRT has no kernel for,
            `int8_only`, evaluation data that does not fit) writes no file; the modes
            before it have written theirs.

    Example:
    >>> reports = tfmp.litert.export_all(model, "export", calibration_data=train_ds.take(10),
    ...                                  eval_data=eval_ds)
    >>> print(tfmp.litert.report.format_reports(reports))
    """
    if isinstance(quantizations, str):  # one mode, not its letters
        quantizations = [quantizations]
    repeated = sorted({q for q in quantizations if list(quantizations).count(q) > 1})
    if repeated or not quantizations:
        raise ExportError(f"quantizations={list(quantizations)!r}: give each mode once, at "
                          f"least one, of {', '.join(QUANTIZATIONS)}")
    if isinstance(eval_data, collections.abc.Iterator) and len(quantizations) > 1:
        raise ExportError("eval_data is a one-shot iterator and each mode reads it: give a "
                          "tf.data.Dataset, a list of batches or a tuple of two arrays")
    return _export_modes(model, [(os.path.join(output_dir, export_filename(q)), q)
                                 for q in quantizations],
                         calibration_data=calibration_data, calibration_steps=calibration_steps,
                         eval_data=eval_data, eval_steps=eval_steps, metric=metric,
                         int8_only=int8_only, runtime=runtime)
