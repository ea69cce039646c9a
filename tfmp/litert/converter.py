"""TensorFlow's LiteRT converter as `tfmp.export` drives it: the settings of each mode, the
model's SavedModel written once for all of them, and the converter's errors in one line.

These are the two steps of Keras' own `model.export(format="litert")`: Keras' `ExportArchive`
writes a SavedModel serving `model(x, training=False)` with Keras' input signature, and
TensorFlow's `TFLiteConverter.from_saved_model` converts it (resource variables enabled,
as Keras converts). Taken apart, one SavedModel is converted once per mode: writing it is
about a third of an export's time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
from typing import Any, Iterator, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmp import _compat
from tfmp._messages import first_line
from tfmp.litert.report import ExportError


LITERT_MODES = ("float32", "float16", "dynamic_int8", "full_int8")  # float32: the baseline


def converter_settings(quantization: str, calibration: Optional[list[np.ndarray]]) -> dict[str, Any]:
    """TensorFlow's converter settings (as for `model.export(format="litert", **settings)`).

    Args:
        quantization: `float32`, `float16`, `dynamic_int8` or `full_int8`.
        calibration: full_int8's input batches (None for the other modes).

    Returns:
        Keyword arguments for `model.export(format="litert", ...)`: converter
        attributes, `target_spec` as a dict of its attributes.

    Raises:
        ExportError: another mode (the message lists these), or full_int8 without
            calibration data.
    """
    if quantization not in LITERT_MODES:
        raise ExportError(f"unknown LiteRT quantization {quantization!r}; accepted: "
                          f"{', '.join(LITERT_MODES)}")
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


def converter_error(e: Exception) -> ExportError:
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
    return ExportError(f"the LiteRT converter failed: {(errors or [first_line(e)])[0][:300]}")


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
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


def _apply(converter: Any, settings: dict[str, Any]) -> None:
    """Sets `converter_settings` on a converter (`target_spec` attribute by attribute)."""
    for name, value in settings.items():
        if name == "target_spec":
            for spec_name, spec_value in value.items():
                setattr(converter.target_spec, spec_name, spec_value)
        else:
            setattr(converter, name, value)


class SavedModelConverter:
    """A float32 Keras model's SavedModel, written once (`write`) and converted by every
    `convert`. Use it as a context manager: the SavedModel's directory is removed on exit.

    Args:
        network: A built Keras model with one input, every layer computing in float32
            (`tfmp.litert.conversion.float32_model`).

    Example:
    >>> with SavedModelConverter(float32_model(model)) as source:
    ...     source.write()
    ...     flatbuffer = source.convert(converter_settings("float16", None))
    """

    def __init__(self, network: keras.Model) -> None:
        self.network = network
        self._directory: Optional[tempfile.TemporaryDirectory] = None
        self._written = False

    def __enter__(self) -> "SavedModelConverter":
        self._directory = tempfile.TemporaryDirectory(prefix="tfmp_saved_model_")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def _path(self) -> str:
        if self._directory is None:
            raise RuntimeError("SavedModelConverter used outside its `with` block")
        return self._directory.name

    def write(self) -> None:
        """Writes the SavedModel, as Keras' LiteRT export does (once; later calls do nothing).

        Raises:
            ExportError: the model could not be traced or saved (one line).
        """
        if self._written:
            return
        archive = keras.export.ExportArchive()
        archive.track(self.network)
        try:
            with quiet_tensorflow():
                archive.add_endpoint(
                    "serve", functools.partial(self.network.__call__, training=False),
                    input_signature=_compat.export_input_signature(self.network))
                archive.write_out(self._path(), verbose=False)
        except Exception as e:  # noqa: BLE001 (tracing runs the model's own code)
            raise converter_error(e) from None
        self._written = True

    def convert(self, settings: dict[str, Any]) -> bytes:
        """The LiteRT flatbuffer of the SavedModel under `settings` (`converter_settings`),
        the SavedModel written first if it was not.

        Raises:
            ExportError: the SavedModel could not be written or converted (one line,
                naming the ops LiteRT has no kernel for).
        """
        self.write()
        try:
            with quiet_tensorflow():
                converter = tf.lite.TFLiteConverter.from_saved_model(self._path())
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
                converter.experimental_enable_resource_variables = True  # as Keras converts
                _apply(converter, settings)
                return converter.convert()
        except Exception as e:  # noqa: BLE001 (the converter raises several kinds)
            raise converter_error(e) from None
