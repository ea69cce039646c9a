"""`tfmp.export`: a trained Keras model to a quantized LiteRT (TFLite) file, with an accuracy report.

The usual way to deploy a model trained in mixed precision: quantize it after
training (float16 weights, or int8 calibrated on a representative dataset) and
check on held-out data that accuracy held. LiteRT's kernels compute in float32
or int8, not bfloat16, so the model is first rebuilt with every layer in float32
(the clone `tfmp.convert_policy` makes, weights bit-identical: variables are
float32 under every policy); tfmp's float32 layers and islands stay in the graph. Conversion goes
through Keras' own `model.export(format="litert")` with TensorFlow's converter
settings for each mode, restricted to LiteRT's builtin ops (no TF Select ops,
which LiteRT's standard runtime cannot run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
from typing import Any, Iterable, Optional, Union

import keras
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmp.atomic import atomic_path
from tfmp.litert.release import KERAS_MODES, export_keras
from tfmp.litert.report import (ExportError, ExportReport, array_batches, checked_batch,
                                eval_batches, evaluate)
from tfmp.litert.runner import Runner
from tfmp.precision import policy_scope
from tfmp.rewrite import (HALF_DTYPES, clone_with_dtypes, example_inputs, is_copyable, iter_layers,
                          model_policy, run_model, set_policies)

LITERT_MODES = ("float32", "float16", "dynamic_int8", "full_int8")  # float32: the baseline
# The .keras file with 16-bit weights (tfmp.weights), judged beside the LiteRT files.
QUANTIZATIONS = LITERT_MODES + KERAS_MODES


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
                          f"export: {_one_line(e)}") from None


def _check_model(model: keras.Model) -> None:
    if not model.built:
        raise ExportError(f"model {model.name!r} is not built: call it on data or give it an Input")
    try:
        inputs = keras.tree.flatten(example_inputs(model))
        outputs = run_model(model, training=False).output_dtypes
    except Exception as e:  # noqa: BLE001 (a model's own code raises anything when traced)
        raise ExportError(f"cannot run {model.name!r} to export it: {_one_line(e)}") from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"tfmp.export takes a model with one input and one output; "
                          f"{model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs")


def _inputs_of(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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
        batches.append(checked_batch(_inputs_of(batch), model, "calibration data"))
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


def converter_settings(quantization: str, calibration: Optional[list[np.ndarray]]) -> dict[str, Any]:
    """TensorFlow's converter settings (for `model.export(format="litert", **settings)`).

    Args:
        quantization: One of `QUANTIZATIONS`.
        calibration: full_int8's input batches (None for the other modes).

    Returns:
        Keyword arguments for `model.export(format="litert", ...)`.

    Raises:
        ExportError: an unknown mode, or full_int8 without calibration data.
    """
    check_quantization(quantization)
    settings: dict[str, Any] = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if quantization != "float32":
        settings["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        settings["target_spec"]["supported_types"] = [tf.float16]
    elif quantization == "full_int8":
        if calibration is None:
            raise ExportError("full_int8 needs calibration data (a representative sample of "
                              "the training inputs)")
        settings["target_spec"]["supported_ops"] = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        settings["representative_dataset"] = lambda: ([x] for x in calibration)
    return settings


_NO_KERNEL = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_WHERE = re.compile(r'fused\["(\w+):", "([^"@]+)@')


def _converter_error(e: Exception) -> ExportError:
    """The converter's multi-page error as one line, naming the ops it could not convert."""
    text = str(e)
    missing = sorted(set(_NO_KERNEL.findall(text)))
    if missing:
        where = f"(at {', '.join(sorted({p for op, p in _WHERE.findall(text) if op in missing}))})"
        if "bf16>" in text:  # the ops exist, not for bfloat16
            return ExportError(f"LiteRT has no bfloat16 kernel for {', '.join(missing)} {where}: "
                               "something computes in bfloat16 whatever the layers' policy (a cast "
                               "in the model's code?); LiteRT runs float32 and int8")
        return ExportError(f"LiteRT has no builtin kernel for {', '.join(missing)} {where}: "
                           "replace the op, or export with TensorFlow's converter and TF Select "
                           "ops yourself")
    errors = [l.strip() for l in text.splitlines() if "error:" in l]
    return ExportError(f"the LiteRT converter failed: {(errors or [_one_line(e)])[0][:300]}")


@contextlib.contextmanager
def _quiet_tensorflow():
    """TensorFlow's INFO lines about the intermediate SavedModel (assets, fingerprint) and
    the quantizer's C++ `fully_quantize: 0, inference_type: ...` on stdout, hidden.
    Errors still arrive: the converter raises them."""
    logger, verbosity = tf.get_logger(), absl_logging.get_verbosity()
    level = logger.level
    logger.setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        logger.setLevel(level)
        absl_logging.set_verbosity(verbosity)


def export_filename(quantization: str) -> str:
    """The file name tools/export writes a mode to.

    Args:
        quantization: One of `QUANTIZATIONS`.

    Returns:
        `model_<mode>.tflite`, or `model_<mode>.keras` for the Keras modes.
    """
    return f"model_{quantization}.{'keras' if quantization in KERAS_MODES else 'tflite'}"


def _check_destination(path: str, quantization: str) -> None:
    suffix = ".keras" if quantization in KERAS_MODES else ".tflite"
    if not str(path).endswith(suffix):
        raise ExportError(f"export path {path!r} must end with {suffix} for {quantization}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ExportError(f"cannot write {path!r}: {directory!r} is not a writable directory")


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
            must exist.
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
        ExportError: a bad quantization name or destination, a model that is
            not single-input/single-output, calibration or evaluation data of
            the wrong shape or dtype, an op LiteRT has no kernel for (named),
            or with `int8_only` an op left in float32 (named). Nothing is
            written then.

    Example:
    >>> report = tfmp.export(model, "m.tflite", "full_int8", calibration_data=train_ds.take(10),
    ...                      eval_data=eval_ds)
    >>> report.accuracy_drop, report.size_bytes
    """
    check_quantization(quantization)  # before any work
    _check_destination(path, quantization)
    _check_model(model)
    if quantization in KERAS_MODES:
        return export_keras(model, path, quantization, eval_data=eval_data,
                            eval_steps=eval_steps, metric=metric)
    calibration = (calibration_batches(calibration_data, calibration_steps, model)
                   if quantization == "full_int8" and calibration_data is not None else None)
    network = float32_model(model)
    settings = converter_settings(quantization, calibration)
    with atomic_path(path, ".tflite") as tmp:
        try:
            with _quiet_tensorflow():
                network.export(tmp, format="litert", verbose=False, **settings)
        except Exception as e:  # noqa: BLE001 (the converter raises several kinds)
            raise _converter_error(e) from None
        runner = Runner(tmp, runtime)
        float_ops = dict(runner.float_ops) if quantization == "full_int8" else {}
        if int8_only and float_ops:
            raise ExportError("full_int8 with int8_only: no int8 kernel for " + ", ".join(
                f"{op} (x{n})" for op, n in sorted(float_ops.items())) + "; they would stay float32")
        report = ExportReport(
            quantization=quantization, path=str(path), size_bytes=os.path.getsize(tmp),
            float32_bytes=4 * int(model.count_params()), float_ops=float_ops,
            runtime=runner.runtime, model_policy=model_policy(model))
        if eval_data is not None:  # before the file is in place: bad eval data writes nothing
            report = dataclasses.replace(report, **evaluate(
                model, network, runner, eval_batches(eval_data), eval_steps, metric))
    return report
