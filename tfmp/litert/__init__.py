"""Deployment to LiteRT (TFLite): conversion, the report it is judged by, and the interpreter.

`tfmp.export(model, path, quantization, ...)` (`conversion`; `export_all` for several
modes at once) writes a quantized LiteRT file and returns an `ExportReport` (`report`:
metric, output difference, size, latency; `format_reports` for a run of them); `gate_failures`
(`gate`) says which exports lost more accuracy than allowed, and what usually causes it; `Runner`
(`runner`) runs a file on LiteRT's interpreter or tf.lite's. The `keras_bfloat16` /
`keras_float16` modes (`release`) write the `.keras` file with 16-bit release weights
instead, judged the same way.
"""

from tfmp.litert.conversion import export, export_all
from tfmp.litert.gate import gate_failures
from tfmp.litert.report import ExportError, ExportReport, format_reports
from tfmp.litert.runner import Runner

__all__ = ["ExportError", "ExportReport", "Runner", "export", "export_all", "format_reports",
           "gate_failures"]
