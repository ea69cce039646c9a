"""tfmp.export: the reference models, trained briefly in bfloat16, exported in every mode;
the interpreter's outputs against the Keras model's; ops LiteRT cannot run; bad input."""

from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import helpers
import tfmp
from tfmp.app import data
from tfmp.rewrite import islands
from tfmp.litert import ExportError, export_all
from tfmp.litert import conversion
from tfmp.litert.conversion import (QUANTIZATIONS, calibration_batches, export_filename,
                                    float32_model)
from tfmp.litert.converter import LITERT_MODES, SavedModelConverter, converter_settings
from tfmp.litert.report import Inference

import models

# Largest |exported - float32 Keras output| / largest |float32 output| allowed per mode,
# and the largest accuracy change (either way) on the evaluation batches.
TOLERANCE = {"float32": 1e-5, "float16": 0.005, "dynamic_int8": 0.05, "full_int8": 0.25,
             # keras_*: 16-bit weights in a model computing in bfloat16: its float32 layers (the
             # head, norms) see the rounded weights, the others round them to bfloat16 anyway
             "keras_bfloat16": 0.03, "keras_float16": 0.03}
ACCURACY = {"float32": 0.02, "float16": 0.02, "dynamic_int8": 0.05, "full_int8": 0.1,
            "keras_bfloat16": 0.02, "keras_float16": 0.02}
# Stored size / float32 weight bytes: 0.5 and 0.25 plus the graph, which weighs a lot
# next to these tiny models' weights (at the default sizes: README).
SIZE = {"float32": 1.3, "float16": 0.75, "dynamic_int8": 0.55, "full_int8": 0.55,
        # the .keras archive: weights at 0.5 plus the config and HDF5's headers
        # (vs the same .keras file with float32 weights; the config weighs as much here)
        "keras_bfloat16": 0.8, "keras_float16": 0.8}
TINY = {"mlp": dict(hidden=(64, 64)), "cnn": dict(width=16, stages=1),
        "transformer": dict(dim=32, heads=2, depth=1)}
# Ops with no int8 kernel, left in float32 by full_int8: the Neg inside LayerNorm.
LEFT_IN_FLOAT32 = {"mlp": {}, "cnn": {}, "transformer": {"NEG": 3}}


def _trained(name: str, steps: int = 60, train_examples: int = 4096):
    build, kind = models.get(name)
    d = data.synthetic(kind, 64, seed=0, train_examples=train_examples, eval_examples=256)
    keras.utils.set_random_seed(0)
    model = build(**d.model_kwargs(), **TINY[name])
    model, optimizer = tfmp.prepare(model, keras.optimizers.Adam(3e-3), "bf16")
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(d.train, steps_per_epoch=steps, epochs=1, verbose=0)
    return model, d


@pytest.mark.parametrize("name", sorted(TINY))
def test_reference_model_exports_in_every_mode(name, tmp_path):
    # The tiny CNN learns too slowly for its accuracy to be checked: a few steps are enough
    # for what is (the output differences); its bfloat16 convolutions are emulated (slow) on
    # a CPU without bfloat16 instructions.
    # The CNN's images: the 10 batches export_all calibrates on (its 5 steps the first half),
    # not 4096 images copied through each shuffle buffer.
    model, d = _trained(name, **(dict(steps=5, train_examples=640) if name == "cnn" else {}))
    if name == "transformer":  # tfmp's layers and the GELU island are in the exported graph
        assert model.get_layer("block0_ff1").activation is islands.float32_gelu
    # Every mode from one float32 copy and one SavedModel (the files and reports of one
    # tfmp.export per mode: test_export_all_writes_what_keras_litert_export_and_export_write).
    reports = export_all(model, str(tmp_path), calibration_data=d.train, eval_data=d.eval)
    assert [r.quantization for r in reports] == list(QUANTIZATIONS)
    for quantization, report in zip(QUANTIZATIONS, reports):
        path = tmp_path / export_filename(quantization)
        assert report.path == str(path) and path.stat().st_size == report.size_bytes
        assert report.size_bytes < SIZE[quantization] * report.float32_bytes, report
        assert report.runtime == ("keras" if quantization.startswith("keras_") else "litert")
        assert report.model_policy == "mixed_bfloat16"
        assert report.relative_diff <= TOLERANCE[quantization], report
        assert abs(report.accuracy_drop) <= ACCURACY[quantization], report
        assert report.batches == 4 and report.keras_ms > 0 and report.exported_ms > 0
        expected_floats = LEFT_IN_FLOAT32[name] if quantization == "full_int8" else {}
        assert report.float_ops == expected_floats, report
    # The model learned something (the tiny CNN learns too slowly for 60 steps: for it the
    # output differences above are what is checked).
    if name != "cnn":
        assert report.keras_metric > 1 / d.num_classes + 0.1, report


def _with_op(op):
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(4)(op(keras.layers.Dense(16)(inputs)))
    return keras.Model(inputs, outputs)


CALIBRATION = np.random.RandomState(0).rand(64, 16).astype("float32")


def test_an_op_without_an_int8_kernel_stays_float32_or_is_refused_by_name(tmp_path):
    model = _with_op(lambda x: ops.cumsum(x, axis=-1))
    path = tmp_path / "m.tflite"
    labels = np.zeros(len(CALIBRATION), "int32")
    report = tfmp.export(model, str(path), "full_int8", calibration_data=CALIBRATION,
                         eval_data=(CALIBRATION, labels))  # arrays, in batches of 32
    assert report.float_ops == {"CUMSUM": 1}
    assert report.batches == 2 and report.batch_size == 32 and report.relative_diff < 0.25
    given = keras.metrics.SparseCategoricalAccuracy()  # an object, not a name
    again = tfmp.export(model, str(tmp_path / "again.tflite"), "full_int8",
                        calibration_data=CALIBRATION, eval_data=(CALIBRATION, labels + 1),
                        metric=given)
    # The Keras and the exported model each had a metric of their own, and the
    # caller's object was not used up: one shared state made every drop 0.
    assert given.count.numpy() == 0
    assert again.keras_metric == float(np.mean(np.argmax(model(CALIBRATION), -1) == 1))
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"no int8 kernel for CUMSUM \(x1\)"):
        tfmp.export(model, str(path), "full_int8", calibration_data=CALIBRATION, int8_only=True)
    assert path.read_bytes() == b"previous export"  # not replaced by the refused model


def test_export_all_writes_what_keras_litert_export_and_export_write(tmp_path, monkeypatch):
    keras.utils.set_random_seed(0)
    with tfmp.policy_scope("mixed_bfloat16"):  # its float32 copy is the reference
        model = _with_op(lambda x: ops.relu(HalfUnlessInference()(x)))
    labels = np.zeros(len(CALIBRATION), "int32")
    made = {"copies": 0, "saved_models": 0, "inferences": 0}

    def counting(key, function):
        def counted(*args, **kwargs):
            made[key] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(conversion, "float32_model", counting("copies", float32_model))
    write = SavedModelConverter.write

    def counted_write(self):
        made["saved_models"] += not self._written  # a SavedModel written, not one reused
        write(self)

    monkeypatch.setattr(SavedModelConverter, "write", counted_write)
    init = Inference.__init__

    def counted_init(self, traced):
        made["inferences"] += type(self) is Inference  # not the loaded .keras file's runner
        init(self, traced)

    monkeypatch.setattr(Inference, "__init__", counted_init)
    modes = (*LITERT_MODES, "keras_bfloat16")
    # export/ does not exist yet: made, as tools/export makes its --output_dir
    reports = export_all(model, str(tmp_path / "export"), modes, calibration_data=CALIBRATION,
                         eval_data=(CALIBRATION, labels))
    # One float32 copy, one SavedModel, one traced inference of the model and one of its
    # copy, for five modes.
    assert made == {"copies": 1, "saved_models": 1, "inferences": 2}
    monkeypatch.undo()
    calibration = calibration_batches(CALIBRATION, 10, model)
    network = float32_model(model)
    for quantization, report in zip(LITERT_MODES, reports):
        keras_path = tmp_path / f"keras_{quantization}.tflite"  # Keras' own export, fresh
        network.export(str(keras_path), format="litert", verbose=False,
                       **converter_settings(quantization, calibration))
        # One SavedModel converted once per mode: each mode's settings alone, not the last one's
        assert Path(report.path).read_bytes() == keras_path.read_bytes(), quantization
    one = tfmp.export(model, str(tmp_path / "new" / "one.tflite"), "float16",  # folder made
                      eval_data=(CALIBRATION, labels))
    assert one.max_abs_diff == reports[1].max_abs_diff > 0  # against the same float32 copy
    assert (one.keras_metric, one.exported_metric) == (reports[1].keras_metric,
                                                       reports[1].exported_metric)


@pytest.mark.parametrize("quantizations, kwargs, message", [
    (["float16", "float16"], {}, r"give each mode once, at least one, of float32"),
    ([], {}, r"quantizations=\[\]: give each mode once"),
    ("int4", {}, "unknown quantization 'int4'"),  # one name, not its letters
    (["float16", "int4"], {}, "unknown quantization 'int4'"),
    (["float16", "full_int8"], {}, "full_int8 needs calibration data"),
    (["float16", "float32"], {"eval_data": iter([(CALIBRATION, np.zeros(64, "int32"))])},
     "eval_data is a one-shot iterator and each mode reads it"),
    (["float16"], {"runtime": "onnx"}, "unknown runtime 'onnx'; accepted: auto, litert, tf"),
])
def test_export_all_refuses_bad_input_before_writing_anything(tmp_path, quantizations, kwargs,
                                                               message):
    with pytest.raises(ExportError, match=message) as e:
        export_all(_with_op(ops.relu), str(tmp_path), quantizations, **kwargs)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@keras.saving.register_keras_serializable(package="tests")  # the keras_* modes load it back
class HalfUnlessInference(keras.layers.Layer):
    """`x / 2` unless told it is inference (`training=False`): Keras' own LiteRT export
    serves `model(x, training=False)`, so the exported model is the identity here."""

    def call(self, x, training=None):
        return x if training is False else x / 2


@pytest.mark.parametrize("op, message", [
    (ops.arctan, r"LiteRT has no builtin kernel for Atan \(at .*Atan\)"),
    (lambda x: ops.relu(ops.cast(x, "bfloat16")), r"no bfloat16 kernel for Relu \(at .*Relu\)")])
def test_an_op_litert_has_no_kernel_for_is_named_and_nothing_is_written(tmp_path, op, message):
    path = tmp_path / "new" / "m.tflite"  # not even its directory
    with pytest.raises(ExportError, match=message) as e:
        tfmp.export(_with_op(op), str(path), "float16")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantization="int4"), "unknown quantization 'int4'; accepted: float32, float16, dynamic_int8"),
    (dict(path="m.h5"), "must end with .tflite"),
    (dict(path="/dev/null/missing/m.tflite"), "'/dev/null' is not a writable directory"),
    (dict(quantization="full_int8"), "full_int8 needs calibration data"),
    (dict(quantization="full_int8", calibration_data=CALIBRATION[:, :8]),
     r"calibration data has batches of shape \(32, 8\) and dtype float32; the model takes "
     r"\(None, 16\) float32"),
    (dict(quantization="full_int8", calibration_data=CALIBRATION.astype("int32")),
     "dtype int32; the model takes"),
    (dict(quantization="full_int8", calibration_data=[]), "calibration data is empty"),
    (dict(quantization="full_int8", calibration_data=CALIBRATION, calibration_steps=0),
     "calibration_steps=0 must be at least 1"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    kwargs = {"path": "m.tflite", "quantization": "float16", **kwargs}
    with pytest.raises(ExportError, match=message) as e:
        tfmp.export(_with_op(ops.relu), kwargs.pop("path"), kwargs.pop("quantization"), **kwargs)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_token_ids_calibrate_as_integers():
    model = models.get("transformer")[0](input_shape=(8,), vocab_size=50, dim=8, heads=2, depth=1)
    ids = np.arange(64).reshape(8, 8) % 50  # int64 from numpy: cast to the model's int32
    batches = calibration_batches(ids, 10, model)
    assert [b.dtype for b in batches] == [np.dtype("int32")] and batches[0].shape == (8, 8)
    with pytest.raises(ExportError, match="dtype float32; the model takes"):
        calibration_batches(ids.astype("float32"), 10, model)


def test_models_it_cannot_export_are_named(tmp_path):
    a, b = keras.Input((3,)), keras.Input((3,))
    for model, message in [(keras.Model([a, b], keras.layers.Add()([a, b])), "has 2 inputs and 1"),
                           (helpers.Subclassed(), "is not built")]:
        with pytest.raises(ExportError, match=message):
            tfmp.export(model, str(tmp_path / "m.tflite"))
    assert list(tmp_path.iterdir()) == []


def test_evaluation_data_that_does_not_fit_is_one_line(tmp_path):
    model = _with_op(ops.relu)
    for eval_data, message in [
            ((CALIBRATION[0], np.zeros(16)), "dtype float32; the model takes .* \\(unbatched"),
            ([CALIBRATION[:4]], "evaluation data must be batches \\(x, y\\)")]:
        with pytest.raises(ExportError, match=message):
            tfmp.export(model, str(tmp_path / "m.tflite"), eval_data=[eval_data]
                        if isinstance(eval_data, tuple) else eval_data)
    assert list(tmp_path.iterdir()) == []  # checked before the file is put in place


def test_a_layer_given_bfloat16_on_purpose_is_exported_in_float32(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.Dense(16, activation="relu", dtype="mixed_bfloat16", name="half")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, dtype="float32")(keras.layers.Dense(16)(h)))
    report = tfmp.export(model, str(tmp_path / "m.tflite"), "float16",
                         eval_data=(CALIBRATION, np.zeros(len(CALIBRATION), "int32")))
    assert report.model_policy == "float32" and report.relative_diff < TOLERANCE["float16"]
    assert model.get_layer("half").compute_dtype == "bfloat16"  # the model itself is untouched


def test_a_tfds_dataset_calibrates_and_evaluates(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=96):
        d = data.load("mnist", "vector", 32)  # 28x28 images, flattened
        model = models.get("mlp")[0](**d.model_kwargs(), hidden=(16,))
        report = tfmp.export(model, str(tmp_path / "m.tflite"), "full_int8",
                             calibration_data=d.train, calibration_steps=2, eval_data=d.eval)
    assert report.batches == 3 and report.batch_size == 32 and 0 <= report.exported_metric <= 1
    assert report.relative_diff <= TOLERANCE["full_int8"], report


def test_a_model_with_bfloat16_weights_exports(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.get("mlp")[0](input_shape=(16,), num_classes=4, hidden=(16,))
    model, _ = tfmp.prepare(model, "adam", "bf16", weights_dtype="bfloat16")
    assert model.get_layer("dense_0").kernel.dtype == "bfloat16"
    report = tfmp.export(model, str(tmp_path / "m.tflite"), "float32",
                         eval_data=(CALIBRATION, np.zeros(len(CALIBRATION), "int32")))
    assert report.relative_diff < TOLERANCE["float32"], report
    assert model.get_layer("dense_0").kernel.dtype == "bfloat16"  # the model is untouched
