"""python -m tools.export: a tools/train run exported, the accuracy gate, and bad input,
all through the binary's own entry point in one child process."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import helpers
from rewrite import corpus
from tfmp.app import data, training
from tfmp.litert.conversion import export_filename
from tfmp.rewrite.classify import model_policy

import models


def _op_model(op):
    inputs = keras.Input((data.VECTOR_DIM,))
    return keras.Model(inputs, keras.layers.Dense(10)(op(keras.layers.Dense(16)(inputs))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    run = d / "run"
    config = training.TrainConfig(model="mlp", precision="bf16", epochs=1, steps_per_epoch=40,
                                  batch_size=64, learning_rate=3e-3, model_dir=str(run))
    training.train(config, models.get("mlp")[0], data.synthetic("vector", 64),
                   tf.distribute.get_strategy())
    _op_model(lambda x: ops.cumsum(x, axis=-1)).save(d / "cumsum.keras")
    _op_model(ops.arctan).save(d / "atan.keras")
    x = data.synthetic_arrays("vector", 128, seed=3)[0]
    np.save(d / "calibration.npy", x)
    np.save(d / "skewed.npy", 0.05 * x)  # calibration data that does not look like the inputs
    np.save(d / "narrow.npy", x[:, :8])
    np.save(d / "ids.npy", x.astype("int32"))
    (d / "text.keras").write_text("not a model")
    (d / "text.npy").write_text("not an array")
    (d / "empty").mkdir()
    for name, summary in DAMAGED_SUMMARIES.items():
        (d / name).mkdir()
        shutil.copy(run / "model.keras", d / name)
        if summary is not None:
            (d / name / "summary.json").write_bytes(summary)
    for folder, earlier in (("atan", EARLIER_EXPORT), ("gate", EARLIER_EXPORTS)):
        (d / folder).mkdir()
        for name, content in earlier.items():
            (d / folder / name).write_bytes(content)
    keras.config.set_dtype_policy("mixed_bfloat16")
    subclassed = corpus.SubclassedNet(classes=10, name="net")
    subclassed(np.zeros((1, data.VECTOR_DIM), "float32"))
    subclassed.save(d / "sub.keras")
    keras.config.set_dtype_policy("float32")
    cases = {
        "default": [f"--model_dir={run}", "--eval_steps=4", "--max_accuracy_drop=0.05"],
        # The default gate (--max_accuracy_drop=0.01), and the same export with it off
        "gate": [f"--model_dir={run}", "--quantization=full_int8", f"--output_dir={d}/gate",
                 f"--calibration_data={d}/skewed.npy", "--eval_steps=4", "--overwrite"],
        "npy": [f"--model_path={run}/model.keras", "--quantization=full_int8",
                f"--calibration_data={d}/skewed.npy", f"--output_dir={d}/npy",
                "--eval_steps=2", "--runtime=tf", "--max_accuracy_drop=inf"],
        "subclassed": [f"--model_path={d}/sub.keras", "--import_modules=rewrite.corpus",
                       "--quantization=float16", "--eval_steps=2", f"--output_dir={d}/sub",
                       "--metric=sparse_top_k_categorical_accuracy"],
        **{f"bad{i}": [a.format(d=d, run=run) for a in args] for i, (args, _) in enumerate(BAD)},
    }
    results = helpers.run_tool_cases("export", list(cases.values()), stdout=True,
                                     PYTHONPATH=os.path.join(helpers.ROOT, "tests"))
    return d, run, dict(zip(cases, results))


DAMAGED_SUMMARIES = {"bad_summary": b'{"flags": {"model": "ml', "no_summary": None,
                     "garbage_summary": b"\xff\xfe\x00", "list_summary": b"[]",
                     "no_flags": b'{"flags": 3}', "bad_seed": b'{"flags": {"seed": "abc"}}'}
EARLIER_EXPORT = {"model_float16.tflite": b"an earlier export", "export.json": b'{"earlier": 1}'}
EARLIER_EXPORTS = {**EARLIER_EXPORT, "model_full_int8.tflite": b"earlier int8",  # more modes
                   "model_keras_float16.keras": b"earlier keras", "notes.txt": b"the user's"}
BAD = [
    (["--model_dir={d}/bad_summary"], "{d}/bad_summary/summary.json is damaged (JSONDecodeError: "),
    (["--model_dir={d}/no_summary"], "{d}/no_summary/summary.json is missing"),
    (["--model_dir={d}/garbage_summary"],
     "{d}/garbage_summary/summary.json is damaged (UnicodeDecodeError: "),
    (["--model_dir={d}/list_summary"], "summary.json is damaged (a JSON list, not an object)"),
    (["--model_dir={d}/no_flags"], "summary.json is damaged (no 'flags' object)"),
    (["--model_dir={d}/bad_seed"], "summary.json is damaged (flags.seed='abc' is not an integer)"),
    (["--model_path={d}/missing.keras"], "--model_path='{d}/missing.keras' does not exist"),
    (["--model_path={d}/text.keras"], "is not a loadable .keras model"),
    (["--model_dir={d}/empty"], "--model_dir='{d}/empty' has no model.keras"),
    (["--model_dir={run}", "--model_path={d}/cumsum.keras"], "one of them"),
    (["--model_dir={run}", "--quantization=float16,int4"],
     "--quantization='float16,int4': accepted values are float32, float16, dynamic_int8, full_int8"),
    (["--model_dir={run}", "--quantization=float16,float16"],
     "--quantization='float16,float16': accepted values are float32, float16, dynamic_int8, "
     "full_int8, keras_bfloat16, keras_float16 (comma-separated, each once)"),
    (["--model_dir={run}", "--max_accuracy_drop=nan"],
     "--max_accuracy_drop=nan must be a number (0.01 = one point of accuracy; inf turns the gate "
     "off)"),
    (["--model_dir={run}", "--metric=accuracy_of_sorts"],
     "--metric='accuracy_of_sorts' is not a Keras metric"),
    (["--model_dir={run}", "--output_dir={d}/text.npy/sub"],
     "--output_dir='{d}/text.npy/sub' cannot be created: '{d}/text.npy' is not a writable directory"),
    # (an output folder of their own: {run}/export holds the "default" case's export)
    (["--model_dir={run}", "--quantization=full_int8", "--calibration_data={d}/narrow.npy",
      "--output_dir={d}/bad"],
     "calibration data has batches of shape (64, 8) and dtype float32; the model takes (None, 64)"),
    (["--model_dir={run}", "--quantization=full_int8", "--calibration_data={d}/ids.npy",
      "--output_dir={d}/bad"],
     "dtype int32; the model takes (None, 64) float32"),
    (["--model_dir={run}", "--quantization=full_int8", "--calibration_data={d}/text.npy",
      "--output_dir={d}/bad"],
     "is not a .npy file"),
    (["--model_path={d}/cumsum.keras", "--quantization=full_int8", "--int8_only",
      "--output_dir={d}/strict"], "no int8 kernel for CUMSUM (x1)"),
    (["--model_path={d}/atan.keras", "--quantization=float16", "--output_dir={d}/atan"],
     "--output_dir='{d}/atan' holds a previous result (export.json, model_float16.tflite): give "
     "--overwrite to move it into {d}/atan/previous.<date>-<time>/ (nothing is deleted), or "
     "another --output_dir"),
    (["--model_path={d}/atan.keras", "--quantization=float16", "--output_dir={d}/atan",
      "--overwrite"], "LiteRT has no builtin kernel for Atan"),
    (["--model_dir={run}", "--dataset=cifar10", "--output_dir={d}/bad"],
     "dataset 'cifar10' is not prepared"),
]


def test_a_training_run_is_exported_in_every_mode_with_its_report(runs):
    d, run, results = runs
    code, stderr, stdout = results["default"]
    assert code == 0, stderr
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["dataset"] == "synthetic" and report["gate_failures"] == []
    assert report["model_file_bytes"] == (run / "model.keras").stat().st_size
    assert [r["quantization"] for r in report["reports"]] == ["float32", "float16", "dynamic_int8",
                                                              "full_int8", "keras_bfloat16",
                                                              "keras_float16"]
    for r in report["reports"]:
        assert (run / "export" / export_filename(r["quantization"])).stat().st_size == r["size_bytes"]
        assert r["model_policy"] == "mixed_bfloat16" and r["batches"] == 4
        assert abs(r["accuracy_drop"]) <= 0.05 and r["exported_ms"] > 0
        assert f"| {r['quantization']} | " in stdout
    for r in report["reports"][-2:]:  # the .keras files with 16-bit weights, loaded by Keras
        assert r["runtime"] == "keras" and r["size_ratio"] < 0.55 and r["relative_diff"] < 0.03
        loaded = keras.models.load_model(run / "export" / export_filename(r["quantization"]))
        assert model_policy(loaded) == "mixed_bfloat16"  # as trained: any policy loads it
    assert "KB (weights and optimizer state); wrote model_float32.tflite, model_float16.tflite, " \
        "model_dynamic_int8.tflite, model_full_int8.tflite, model_keras_bfloat16.keras, " \
        "model_keras_float16.keras and export.json" in stdout
    assert sorted(p.name for p in (run / "export").iterdir()) == sorted(  # no other file
        [export_filename(r["quantization"]) for r in report["reports"]] + ["export.json"])
    # Each phase says what it does, in one log line
    phases = ["writing the SavedModel of 'mlp' in float32", *(
        f"{'writing' if q.startswith('keras_') else 'converting'} {q}" for q in
        [r["quantization"] for r in report["reports"]]), *(
        f"evaluating {r['quantization']} on 4 batches" for r in report["reports"]),
        f"writing {run}/export/export.json"]
    for phase in phases:
        assert len([l for l in stderr.splitlines() if phase in l]) == 1, (phase, stderr[-3000:])


def test_a_saved_subclassed_model_is_exported(runs):
    d, _, results = runs
    code, stderr, _ = results["subclassed"]  # its class imported with --import_modules
    assert code == 0, stderr  # within the default gate
    (report,) = json.loads((d / "sub" / "export.json").read_text())["reports"]
    assert report["quantization"] == "float16" and report["relative_diff"] < 5e-3
    assert report["metric"] == "sparse_top_k_categorical_accuracy"
    assert (d / "sub" / "model_float16.tflite").stat().st_size == report["size_bytes"]


def _statistics(x):
    x = x.astype("float64")
    return f"mean {x.mean():.3g} std {x.std():.3g} min {x.min():.3g} max {x.max():.3g}"


def test_the_default_gate_fails_with_the_figures_the_cause_and_keeps_the_files(runs):
    d, _, results = runs
    code, stderr, _ = results["gate"]  # full_int8 calibrated on inputs 20 times too small
    assert code == 1, stderr
    (line,) = [line for line in stderr.splitlines() if "error:" in line]
    assert "accuracy gate (--max_accuracy_drop=0.01) failed: full_int8: " \
        "sparse_categorical_accuracy " in line
    # What usually causes it, with the calibration and evaluation inputs side by side
    assert (f"usually calibration data that does not look like the inputs (calibration inputs "
            f"{_statistics(np.load(d / 'skewed.npy'))} vs evaluation inputs mean ") in line, line
    report = json.loads((d / "gate" / "export.json").read_text())
    assert report["max_accuracy_drop"] == 0.01 and len(report["gate_failures"]) == 1
    assert report["gate_failures"][0] in line and (d / "gate" / "model_full_int8.tflite").exists()


def test_overwrite_moves_the_previous_export_aside_whole(runs):
    d, _, results = runs
    _, stderr, _ = results["gate"]  # --overwrite, one mode where an export of three was
    (previous,) = (d / "gate").glob("previous.*")
    earlier = {n: c for n, c in EARLIER_EXPORTS.items() if n != "notes.txt"}
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == earlier
    # The report describes its folder: its files and nothing of the earlier export
    assert sorted(p.name for p in (d / "gate").iterdir()) == [
        "export.json", "model_full_int8.tflite", "notes.txt", previous.name]
    (report,) = json.loads((d / "gate" / "export.json").read_text())["reports"]
    assert report["path"] == f"{d}/gate/model_full_int8.tflite"
    assert (d / "gate" / "notes.txt").read_bytes() == b"the user's"
    assert f"moved the previous result in {d}/gate (export.json, model_float16.tflite, " \
        f"model_full_int8.tflite, model_keras_float16.keras) to {previous}" in stderr


def test_the_gate_turned_off_calibration_from_an_array_file_and_tf_lite_runtime(runs):
    d, _, results = runs
    code, stderr, _ = results["npy"]  # the same export as "gate", --max_accuracy_drop=inf
    assert code == 0, stderr
    report = json.loads((d / "npy" / "export.json").read_text())
    assert report["max_accuracy_drop"] is None and report["gate_failures"] == []
    (export,) = report["reports"]
    assert export["runtime"] == "tf" and export["quantization"] == "full_int8"
    assert export["accuracy_drop"] > 0.05  # the default gate would have failed it


@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line(runs, case):
    d, run, results = runs
    code, stderr, _ = results[f"bad{case}"]
    assert code == 2, stderr
    assert BAD[case][1].format(d=d, run=run) in stderr
    assert "Traceback" not in stderr, stderr
    assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr


def test_refused_exports_write_nothing(runs):
    d, _, _ = runs
    assert not (d / "strict").exists()  # --int8_only with CUMSUM: not even the folder
    # Refused, then Atan has no LiteRT kernel (with --overwrite): the earlier export in
    # that directory is left as it was, nothing moved.
    assert {p.name: p.read_bytes() for p in (d / "atan").iterdir()} == EARLIER_EXPORT
