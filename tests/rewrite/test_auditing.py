"""Each audit finding, triggered by a model built to have it; none on a clean model."""

import json
import warnings

import keras
import pytest

import tfmp
from tfmp.precision import HardwareInfo

CPU = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))
GPU = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))
TPU = HardwareInfo("tpu", ("TPU:0",))


def _model(out_dtype="float32", units=16, extra=()):
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(units), *extra,
                             keras.layers.Dense(4, dtype=out_dtype)])


def _set(policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tfmp.set_policy(policy, hardware=GPU)


@pytest.mark.parametrize("policy", ["bf16", "fp16", "fp32"])
def test_clean_model_has_no_findings(policy):
    _set(policy)
    model = _model()
    opt = tfmp.wrap_optimizer(keras.optimizers.Adam())
    report = tfmp.audit(model, opt, hardware=CPU)
    assert report.findings == () and report.ok
    assert "no findings" in str(report)


def test_output_not_float32():
    _set("bf16")
    report = tfmp.audit(_model(out_dtype=None), hardware=CPU)
    assert report.codes() == {"output-not-float32"}
    assert not report.ok and report.errors[0].path == report.findings[0].path


def test_softmax_and_normalization_in_half():
    _set("bf16")
    model = _model(extra=[keras.layers.Softmax(), keras.layers.UnitNormalization(),
                          keras.layers.LayerNormalization()])  # LayerNorm upcasts itself
    report = tfmp.audit(model, hardware=CPU)
    assert report.codes() == {"softmax-half", "normalization-half"}
    assert report.ok  # warnings only
    assert {f.path for f in report.warnings} == {model.layers[1].name, model.layers[2].name}


def test_a_square_root_of_no_sum_is_no_normalization():
    _set("bf16")
    model = _model(extra=[keras.layers.Lambda(lambda x: keras.ops.sqrt(keras.ops.abs(x)))])
    report = tfmp.audit(model, hardware=CPU)
    assert "normalization-half" not in report.codes(), str(report)


def test_half_variables_and_optimizer_slots():
    keras.config.set_dtype_policy("float16")  # pure float16: variables in float16
    model = _model(out_dtype="float16")
    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    report = tfmp.audit(model, tfmp.wrap_optimizer(opt, "fp16"), hardware=GPU)
    assert {"variable-not-float32", "optimizer-slot-not-float32",
            "output-not-float32"} <= report.codes()
    paths = {f.path for f in report.findings if f.code == "variable-not-float32"}
    assert model.layers[0].kernel.path in paths


@pytest.mark.parametrize("rounding", ["stochastic", "kahan", "nearest"])
def test_16_bit_weights_pass_only_with_an_optimizer_that_keeps_their_updates(rounding):
    _set("bf16")  # the global policy mixed_bfloat16; the hidden layer stores bfloat16
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, dtype="bfloat16"),
                              keras.layers.Dense(4, dtype="float32")])
    opt = tfmp.compensate(keras.optimizers.Adam(), rounding=rounding)
    opt.build(model.trainable_variables)
    report = tfmp.audit(model, opt, hardware=CPU)
    if rounding == "nearest":  # Keras' rounding: the updates are lost, the error stays
        variable = [f for f in report.findings if f.code == "variable-not-float32"]
        assert variable and "tfmp.compensate(optimizer)" in variable[0].fix
        assert "weights_dtype='bfloat16'" in variable[0].fix
        assert "optimizer-slot-not-float32" in report.codes()
    else:
        assert report.ok, str(report)
        assert {"variables-compensated"} == report.codes(), str(report)
        found = report.findings[0]
        assert found.severity == "info" and f"rounding={rounding!r}" in found.problem
        assert found.problem.startswith("2 variable(s) in 16 bits")
    stock = keras.optimizers.Adam()
    assert {"variable-not-float32", "optimizer-slot-not-float32"} <= tfmp.audit(
        model, stock, hardware=CPU).codes()


def test_16_bit_statistics_stay_an_error_under_a_compensated_optimizer():
    _set("bf16")  # no optimizer updates moving statistics: nothing compensates them
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, dtype="bfloat16"),
                              keras.layers.BatchNormalization(dtype="bfloat16"),
                              keras.layers.Dense(4, dtype="float32")])
    opt = tfmp.compensate(keras.optimizers.Adam())
    opt.build(model.trainable_variables)
    report = tfmp.audit(model, opt, hardware=CPU)
    errors = {f.path: f for f in report.errors if f.code == "variable-not-float32"}
    assert set(errors) == {v.path for v in model.non_trainable_variables}, str(report)
    assert "keep it float32" in next(iter(errors.values())).fix
    compensated = [f for f in report.findings if f.code == "variables-compensated"]
    assert compensated[0].problem.startswith("4 variable(s) in 16 bits")  # Dense 2, BN 2


def test_fp16_without_loss_scaling():
    _set("fp16")
    report = tfmp.audit(_model(), keras.optimizers.Adam(), hardware=GPU)
    assert report.codes() == {"fp16-without-loss-scaling"}
    compiled = _model()
    compiled.compile(keras.optimizers.Adam(), "mse", auto_scale_loss=False)
    assert tfmp.audit(compiled, hardware=GPU).codes() == {"fp16-without-loss-scaling"}


def test_loss_scaling_under_bf16_is_wasted():
    _set("bf16")
    opt = tfmp.DynamicLossScaleOptimizer(keras.optimizers.Adam())
    report = tfmp.audit(_model(), opt, hardware=CPU)
    assert report.codes() == {"loss-scaling-without-fp16"} and report.ok
    guard = tfmp.wrap_optimizer(keras.optimizers.Adam(), guard=True)
    assert tfmp.audit(_model(), guard, hardware=CPU).findings == ()


def test_fp16_on_tpu():
    _set("fp16")
    report = tfmp.audit(_model(units=128), tfmp.wrap_optimizer("adam"), hardware=TPU)
    assert report.codes() == {"fp16-on-tpu"}


def test_policy_set_after_model_was_built():
    _set("fp32")
    model = _model()
    _set("bf16")
    report = tfmp.audit(model, hardware=CPU)
    assert report.codes() == {"policy-mismatch"}
    assert "set after the model was built" in report.warnings[0].problem


@pytest.mark.parametrize("hw, units, flagged", [
    (GPU, 10, True), (GPU, 16, False), (TPU, 64, True), (TPU, 256, False), (CPU, 10, False)])
def test_feature_sizes(hw, units, flagged):
    _set("bf16")
    report = tfmp.audit(_model(units=units), hardware=hw)
    sizes = [f for f in report.findings if f.code == "size-not-aligned"]
    assert bool(sizes) == flagged
    if flagged:
        assert f"units={units}" in sizes[0].problem and sizes[0].severity == "info"


def test_report_table_and_json():
    _set("fp16")
    model = _model(out_dtype=None, extra=[keras.layers.Softmax()])
    report = tfmp.audit(model, keras.optimizers.SGD(), hardware=GPU)
    text = str(report).splitlines()
    assert text[0].startswith("tfmp audit (policy mixed_float16): 2 error(s), 1 warning(s)")
    assert text[1].split() == ["severity", "path", "problem", "fix"]
    columns = {line.index(line.split()[1]) for line in text[1:]}
    assert len(columns) == 1  # the path column is aligned
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["policy"] == "mixed_float16"
    assert [f["severity"] for f in data["findings"]] == ["error", "error", "warning"]
    assert set(data["findings"][0]) == {"code", "severity", "path", "problem", "fix"}
