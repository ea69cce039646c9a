"""Deployment to LiteRT (TFLite): conversion, the report it is judged by, and the interpreter.

`tfmp.export(model, path, quantization, ...)` (`conversion`) writes a quantized
LiteRT file and returns an `ExportReport` (`report`: metric, output difference,
size, latency; `format_reports` and `gate_failures` for a run of them); `Runner`
(`runner`) runs a file on LiteRT's interpreter or tf.lite's.
"""

from tfmp.litert.conversion import (QUANTIZATIONS, calibration_batches, check_quantization,
                                    converter_settings, export, float32_model)
from tfmp.litert.report import (ExportError, ExportReport, array_batches, checked_batch,
                                format_reports, gate_failures)
from tfmp.litert.runner import RUNTIMES, Runner

__all__ = ["ExportError", "ExportReport", "QUANTIZATIONS", "RUNTIMES", "Runner", "array_batches",
           "calibration_batches", "check_quantization", "checked_batch", "converter_settings",
           "export", "float32_model", "format_reports", "gate_failures"]
