"""tools/export and tools/compare on what tools/train made of the user's own model and data
(tests/tools/userpkg: a subclassed model of its own package, arrays in an .npz file), through
the binaries in child processes."""

import json
import os
import sys

import numpy as np
import pytest

import helpers

HERE = os.path.dirname(os.path.abspath(__file__))
USER = {"PYTHONPATH": HERE}  # where the user's package `userpkg` is


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One training run on the user's model and arrays; its model.keras exported and compared,
    each also given arrays of the wrong width."""
    sys.path.insert(0, HERE)
    try:
        from userpkg import feed
    finally:
        sys.path.remove(HERE)
    tmp = tmp_path_factory.mktemp("user_results")
    npz, narrow, run = tmp / "with_eval.npz", tmp / "five_features.npz", tmp / "run"
    feed.write_npz(npz, eval_n=128)
    np.savez(narrow, x=np.zeros((64, 5), "float32"), y=np.zeros(64, "int32"))
    ((code, stderr),) = helpers.run_tool_cases("train", [[
        "--model=userpkg.nets:subclassed", "--model_args=width=12",
        "--loss=sparse_categorical_crossentropy", "--metrics=accuracy", f"--data={npz}",
        "--epochs=1", "--steps_per_epoch=20", "--batch_size=32", "--precision=fp32",
        f"--model_dir={run}"]], **USER)
    assert code == 0, stderr[-3000:]
    export = ["--import_modules=userpkg.nets", "--quantization=float32,float16", "--eval_steps=2",
              "--max_accuracy_drop=0.05"]
    exports = helpers.run_tool_cases("export", [
        # the run's data and the module of its --model function, from its summary.json
        [f"--model_dir={run}", *export[1:]],
        [f"--model_dir={run}", *export, f"--data={narrow}", f"--output_dir={tmp}/bad_export"],
        [f"--model_dir={run}", *export, f"--data={npz}", "--dataset=mnist",
         f"--output_dir={tmp}/bad_export"],
    ], stdout=True, **USER)
    compare = [f"--model_path={run}/model.keras", "--import_modules=userpkg.nets",
               "--policies=fp32,bf16", "--steps=10", "--batch_size=32", "--overwrite"]
    compares = helpers.run_tool_cases("compare", [
        [*compare, f"--data={npz}", f"--output_dir={tmp}/cmp"],
        [*compare, f"--dataset={narrow}", f"--output_dir={tmp}/bad_cmp"],  # the alias
    ], stdout=True, **USER)
    return tmp, {"export": exports[0], "export_narrow": exports[1], "export_both": exports[2],
                 "compare": compares[0], "compare_narrow": compares[1]}


def test_a_user_run_is_exported_with_its_arrays(results):
    tmp, runs = results
    code, stderr, stdout = runs["export"]
    assert code == 0, stderr[-3000:]
    report = json.loads((tmp / "run" / "export" / "export.json").read_text())
    assert report["dataset"] == "with_eval.npz" and report["gate_failures"] == []
    assert [r["quantization"] for r in report["reports"]] == ["float32", "float16"]
    for r in report["reports"]:  # evaluated on the arrays' x_eval, y_eval
        assert r["batches"] == 2 and r["metric"] == "sparse_categorical_accuracy"
        assert (tmp / "run" / "export" / f"model_{r['quantization']}.tflite").stat().st_size \
            == r["size_bytes"]
    assert "wrote model_float32.tflite, model_float16.tflite and export.json" in stdout


def test_a_user_run_is_compared_on_its_arrays_with_its_own_loss(results):
    tmp, runs = results
    code, stderr, stdout = runs["compare"]
    assert code == 0, stderr[-3000:]
    report = json.loads((tmp / "cmp" / "compare.json").read_text())
    assert report["dataset"] == "with_eval.npz" and report["ok"]
    assert [r["policy"] for r in report["runs"]] == ["float32", "mixed_bfloat16"]
    assert all(len(r["losses"]) == 10 for r in report["runs"])
    # The loss tools/train compiled model.keras with
    assert report["loss"] == ("sparse_categorical_crossentropy(from_logits=False): the model's "
                              "compiled loss")
    assert (tmp / "cmp" / "compare.png").exists()


@pytest.mark.parametrize("name, fragment", [
    ("export_narrow", "the model takes inputs of shape (6,); dataset 'five_features.npz' has (5,)"),
    ("compare_narrow", "the model takes inputs of shape (6,); dataset 'five_features.npz' has "
                       "(5,)"),
    ("export_both", "--data={tmp}/with_eval.npz and --dataset=mnist disagree; give one of them"),
])
def test_data_that_does_not_fit_is_one_line(results, name, fragment):
    tmp, runs = results
    code, stderr, _ = runs[name]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if "error:" in line]
    assert fragment.format(tmp=tmp) in line, line
    assert not list((tmp / ("bad_cmp" if "compare" in name else "bad_export")).glob("*"))
