"""The accuracy gate of an export run: which exports lost more than allowed, and why.

A failing export's line says what usually costs that mode its accuracy; for
`full_int8` (activations quantized to the ranges seen in the calibration data) it
puts the calibration inputs' statistics beside the evaluation inputs', so that
calibration data unlike the inputs shows at a glance.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np

from tfmp.litert.report import ExportReport, array_batches, eval_batches, inputs_of

GATE_SLACK = 1e-6  # float32 metrics: differences below this are rounding

# What usually costs each mode its accuracy (no ';': failures are joined with it).
CAUSES = {
    "float32": "not quantized, so the converted graph computes otherwise than the Keras model: "
               "usually a Keras model that computes in bfloat16 or float16 (the export computes "
               "in float32) or an op LiteRT implements differently",
    "float16": "weights rounded to float16 (3 significant digits, at most 65504): usually a "
               "layer whose weights need more",
    "dynamic_int8": "weights rounded to 256 int8 levels: usually a layer whose few large weights "
                    "(outliers) stretch its range, which float16 keeps",
    "full_int8": "activations quantized to the ranges seen in the calibration data: usually "
                 "calibration data that does not look like the inputs{statistics}, else "
                 "activations whose outliers stretch int8's 256 levels (dynamic_int8 or float16 "
                 "keep them)",
    "keras_bfloat16": "weights rounded to bfloat16 (2-3 significant digits): usually a float32 "
                      "layer (the output head, a normalization) whose weights need more, which "
                      "keras_float16 keeps",
    "keras_float16": "weights rounded to float16 (3 significant digits): usually a float32 layer "
                     "(the output head, a normalization) whose weights need more",
}
# full_int8 when the calibration inputs look like the evaluation inputs: not the data.
CALIBRATED_ALIKE = ("activations quantized to the ranges seen in the calibration data, which "
                    "look like the inputs{statistics}: usually activations whose outliers stretch "
                    "int8's 256 levels, or an int8 kernel of the runtime (dynamic_int8 or float16 "
                    "keep them)")
STATISTICS = ("mean", "std", "min", "max")


def input_statistics(data: Any, steps: Optional[int] = None) -> dict[str, float]:
    """Mean, standard deviation, minimum and maximum of every input value in `data`.

    Args:
        data: Batches (`x` or `(x, y[, ...])`: a `tf.data.Dataset`, an iterable), one
            array of examples, or a tuple of two arrays `(x, y)`.
        steps: Batches to read (None: all; give it for an endless dataset).

    Returns:
        `{"mean": ..., "std": ..., "min": ..., "max": ...}`, NaN for no value.
    """
    if isinstance(data, np.ndarray):
        data = array_batches(data)
    count, total, squares, low, high = 0, 0.0, 0.0, math.inf, -math.inf
    for i, batch in enumerate(eval_batches(data)):
        if steps is not None and i >= steps:
            break
        x = np.asarray(inputs_of(batch), dtype=np.float64)
        if x.size:
            count += x.size
            total, squares = total + float(x.sum()), squares + float(np.square(x).sum())
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    if not count:
        return dict.fromkeys(STATISTICS, math.nan)
    mean = total / count
    return {"mean": mean, "std": math.sqrt(max(squares / count - mean * mean, 0.0)),
            "min": low, "max": high}


def alike(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two inputs' statistics are alike: means within half a standard deviation,
    standard deviations within a factor of 2 (what int8 calibration ranges follow)."""
    spread = max(a["std"], b["std"], 1e-12)
    return (abs(a["mean"] - b["mean"]) <= 0.5 * spread
            and 0.5 <= (a["std"] + 1e-12) / (b["std"] + 1e-12) <= 2.0)


def _statistics(name: str, statistics: dict[str, float]) -> str:
    return f"{name} inputs " + " ".join(f"{k} {statistics[k]:.3g}" for k in STATISTICS)


def gate_failures(reports: Iterable[ExportReport], max_accuracy_drop: float, *,
                  calibration_data: Any = None, calibration_steps: int = 10,
                  eval_data: Any = None, eval_steps: Optional[int] = None) -> list[str]:
    """One line per evaluated export whose accuracy drop exceeds `max_accuracy_drop`.

    Each line has the figures and what usually causes such a drop in that mode
    (`CAUSES`). A failing `full_int8` line also has the input statistics (mean, std,
    min, max) of the calibration data and of the evaluation data, side by side, when
    both are given (read only then).

    Metrics are float32 fractions: a drop within `GATE_SLACK` of the limit (0.90 - 0.85
    is 0.05000000000000004 in floats) counts as equal, and passes.

    Args:
        reports: `ExportReport`s.
        max_accuracy_drop: The largest drop allowed.
        calibration_data, calibration_steps: What full_int8 was calibrated on, as given to
            `tfmp.export`.
        eval_data, eval_steps: What the exports were evaluated on, as given to `tfmp.export`.

    Returns:
        One line per export over the limit (empty: the gate passes).
    """
    failures = []
    for r in reports:
        if r.accuracy_drop is None or r.accuracy_drop <= max_accuracy_drop + GATE_SLACK:
            continue
        statistics, cause = "", CAUSES.get(r.quantization, "")
        if r.quantization == "full_int8" and calibration_data is not None and \
                eval_data is not None:
            calibration = input_statistics(calibration_data, calibration_steps)
            evaluation = input_statistics(eval_data, eval_steps)
            statistics = (f" ({_statistics('calibration', calibration)} vs "
                          f"{_statistics('evaluation', evaluation)})")
            cause = CALIBRATED_ALIKE if alike(calibration, evaluation) else cause
        cause = cause.format(statistics=statistics)
        failures.append(f"{r.quantization}: {r.metric} {r.keras_metric:.4f} -> "
                        f"{r.exported_metric:.4f}, drop {r.accuracy_drop:.4f} > "
                        f"{max_accuracy_drop:g}" + (f": {cause}" if cause else ""))
    return failures
