"""tfmp.litert.report and gate: the gate and the table, on given reports."""

import itertools

import numpy as np
import pytest

from tfmp.litert import ExportReport
from tfmp.litert.gate import CAUSES, gate_failures, input_statistics
from tfmp.litert.report import format_reports


def _report(quantization, keras_metric=None, exported_metric=None, **kw):
    evaluated = keras_metric is not None
    return ExportReport(
        quantization=quantization, path=f"m_{quantization}.tflite", size_bytes=2048,
        float32_bytes=8192, float_ops=kw.pop("float_ops", {}), runtime="litert",
        model_policy="mixed_bfloat16", metric="acc" if evaluated else None,
        keras_metric=keras_metric, exported_metric=exported_metric,
        max_abs_diff=0.01 if evaluated else None, output_scale=2.0 if evaluated else None,
        keras_ms=2.0 if evaluated else None, exported_ms=1.0 if evaluated else None,
        latency_ratio=(0.4, 0.5, 0.6) if evaluated else None, batches=4, batch_size=64)


def test_the_gate_fails_only_above_the_allowed_drop():
    reports = [_report("float16", 0.90, 0.90), _report("dynamic_int8", 0.90, 0.89),
               _report("full_int8", 0.90, 0.85), _report("float16")]  # the last not evaluated
    assert gate_failures(reports, 0.05) == []  # a drop equal to the limit passes
    assert gate_failures(reports, 0.02) == [  # with what usually causes it in that mode
        "full_int8: acc 0.9000 -> 0.8500, drop 0.0500 > 0.02: activations quantized to the "
        "ranges seen in the calibration data: usually calibration data that does not look like "
        "the inputs, else activations whose outliers stretch int8's 256 levels (dynamic_int8 or "
        "float16 keep them)"]
    failures = gate_failures(reports, -0.001)  # a negative limit asks for a gain
    assert [f.split(":")[0] for f in failures] == ["float16", "dynamic_int8", "full_int8"]
    assert failures[1].endswith("drop 0.0100 > -0.001: " + CAUSES["dynamic_int8"])
    assert all(";" not in cause for cause in CAUSES.values())  # failures are joined with "; "


def _never_read():
    raise AssertionError("the evaluation data was read although no full_int8 export failed")
    yield


def test_a_failing_full_int8_puts_the_calibration_and_evaluation_inputs_side_by_side():
    reports = [_report("float16", 0.90, 0.80), _report("full_int8", 0.90, 0.50)]
    calibration = [np.array([[0.0, 2.0]]), np.array([[0.0, 2.0]]), np.array([[50.0, 50.0]])]
    evaluation = (np.array([[-3.0, 3.0]] * 40), np.zeros(40))  # arrays: batches of 32
    f16, int8 = gate_failures(reports, 0.01, calibration_data=calibration, calibration_steps=2,
                              eval_data=evaluation, eval_steps=None)
    assert f16.endswith(CAUSES["float16"])
    assert ("usually calibration data that does not look like the inputs (calibration inputs "
            "mean 1 std 1 min 0 max 2 vs evaluation inputs mean 0 std 3 min -3 max 3), else "
            "activations whose outliers") in int8
    # Read only for a failing full_int8 export
    assert gate_failures(reports[:1], 0.01, calibration_data=calibration,
                         eval_data=_never_read()) == [f16]


def test_calibration_data_like_the_inputs_is_not_blamed():
    alike = (np.array([[-3.0, 3.0]] * 40), np.zeros(40))
    [int8] = gate_failures([_report("full_int8", 0.90, 0.50)], 0.01, calibration_data=alike,
                           eval_data=alike)
    assert "does not look like" not in int8
    assert "calibration data, which look like the inputs (calibration inputs mean 0" in int8
    assert "usually activations whose outliers stretch" in int8


def test_input_statistics_take_the_inputs_of_so_many_batches():
    endless = itertools.repeat((np.array([[1.0, 3.0]]), np.array([7])))
    assert input_statistics(endless, steps=3) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert input_statistics(np.arange(5.0)) == pytest.approx(
        {"mean": 2.0, "std": np.std(np.arange(5.0)), "min": 0.0, "max": 4.0})
    assert all(np.isnan(v) for v in input_statistics([]).values())


def test_the_table_has_a_row_per_export_with_its_figures():
    table = format_reports([_report("full_int8", 0.9, 0.85, float_ops={"NEG": 5}),
                            _report("float16")])
    rows = table.splitlines()
    assert len(rows) == 4
    assert rows[2] == ("| full_int8 | 2.0 KB (0.25x) | acc 0.9000 -> 0.8500 (+0.0500) | 0.01 (0.5%) "
                       "| 2.00 / 1.00 (0.50x, 0.40-0.60; batch 64, litert) | NEG x5 |")
    assert rows[3] == ("| float16 | 2.0 KB (0.25x) | not evaluated | not evaluated | not evaluated "
                       "| none |")
    assert _report("x", 0.9, 0.85).to_dict()["size_ratio"] == 0.25
