"""tfmp.litert.report: the gate and the table, on given reports."""

from tfmp.litert import ExportReport, format_reports, gate_failures


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
    assert gate_failures(reports, 0.02) == [
        "full_int8: acc 0.9000 -> 0.8500, drop 0.0500 > 0.02"]
    assert len(gate_failures(reports, -0.001)) == 3  # a negative limit asks for a gain


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
