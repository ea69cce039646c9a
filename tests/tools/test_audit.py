"""tools/audit.py end to end, in subprocesses."""

import json
import os

import keras
import numpy as np
import pytest

import helpers
import models
from rewrite import corpus
from rewrite.overflow_models import Energy, functional, task
import tfmp  # noqa: F401  (registers tfmp's layers and optimizer for load_model)
from helpers import ROOT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    keras.config.set_dtype_policy("mixed_bfloat16")
    good = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                             keras.layers.Dense(3, activation="softmax", dtype="float32")])
    bad = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                            keras.layers.Dense(3, activation="softmax")])
    bad.compile("adam", "sparse_categorical_crossentropy")
    good.save(d / "good.keras")
    bad.save(d / "bad.keras")
    (d / "junk.keras").write_text("not a model")
    keras.config.set_dtype_policy("float16")  # 16-bit variables: --fix cannot change them
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                      keras.layers.Dense(3, activation="softmax")]).save(d / "f16.keras")
    keras.config.set_dtype_policy("float32")
    subclassed = corpus.SubclassedNet(name="net")
    subclassed(np.zeros((1, 8), "float32"))
    subclassed.save(d / "sub.keras")
    energy = functional(Energy(name="energy"))  # one layer overflows float16
    energy.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    energy.save(d / "energy.keras")
    x, y = task(64)
    np.savez(d / "inputs.npz", x=x, y=y)
    np.savez(d / "no_x.npz", z=x)
    models.get("mlp")[0]().save(d / "mlp.keras")  # the reference MLP: 'synthetic' fits it
    return d


@pytest.fixture(scope="module")
def runs(all_runs):
    return all_runs[0]


@pytest.fixture(scope="module")
def all_runs(files):
    """Good file, bad file, --fix, the fixed file, --fix on a float16 file, a subclassed
    model, and every bad-input case: runs of the binary, all in one child process."""
    fixed = files / "fixed.keras"
    bad = [[a.format(d=files) for a in args] for args, _ in BAD_INPUT]
    codes = helpers.run_tool_cases("audit", [
        *bad,  # first: one of them needs the custom class not imported yet
        [f"--model_path={files / 'good.keras'}"],
        [f"--model_path={files / 'bad.keras'}"],
        [f"--model_path={files / 'bad.keras'}", "--fix", f"--output_path={fixed}"],
        [f"--model_path={fixed}", "--json"],
        [f"--model_path={files / 'f16.keras'}", "--fix", f"--output_path={files / 'f16_fixed.keras'}"],
        [f"--model_path={files / 'sub.keras'}", "--import_modules=rewrite.corpus"],
        [f"--model_path={files / 'sub.keras'}", "--import_modules=rewrite.corpus", "--fix",
         f"--output_path={files / 'sub_fixed.keras'}"],
        [f"--model_path={files / 'energy.keras'}", f"--import_modules={OVERFLOWS}",
         "--locate_overflows", f"--data={files / 'inputs.npz'}", "--steps=2"],
        [f"--model_path={files / 'mlp.keras'}", "--locate_overflows", "--data=synthetic",
         "--steps=1", "--json"],
    ], stdout=True, PYTHONPATH=os.path.join(ROOT, "tests"))
    names = ("good", "bad", "fix", "fixed", "f16", "subclassed", "subclassed_fix", "locate",
             "locate_healthy")
    return dict(zip(names, codes[len(bad):])), [c[:2] for c in codes[:len(bad)]]


def test_good_file(runs):
    code, stderr, stdout = runs["good"]
    assert code == 0, stderr
    assert "no findings" in stdout


def test_bad_file_and_fix(files, runs):
    code, _, stdout = runs["bad"]
    assert code == 1
    assert "output-not" not in stdout and "model output 0 is bfloat16" in stdout

    out = files / "fixed.keras"
    code, stderr, stdout = runs["fix"]
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    assert runs["fixed"][0] == 0
    fixed = keras.models.load_model(out)
    assert fixed.outputs[0].dtype == "float32"
    assert fixed.compiled  # the compile config was carried over


OVERFLOWS = "rewrite.overflow_models"
BAD_INPUT = [
    (["--model_path=/nonexistent/m.keras"], "--model_path='/nonexistent/m.keras' does not exist"),
    (["--model_path={d}/junk.keras"], "is not a loadable .keras model"),
    (["--model_path={d}"], "is not a readable file"),
    (["--model_path={d}/bad.keras", "--fix"], "--fix needs --output_path"),
    (["--model_path={d}/bad.keras", "--fix", "--output_path={d}/x.h5"], "must end with .keras"),
    (["--model_path={d}/bad.keras", "--fix", "--output_path=/no/dir/x.keras"], "does not exist"),
    (["--model_path={d}/sub.keras"], "a custom class: name its module with --import_modules"),
    (["--model_path={d}/bad.keras", "--import_modules=no_such_module"],
     "--import_modules: cannot import 'no_such_module' (ModuleNotFoundError"),
    (["--model_path={d}/good.keras", "--locate_overflows", "--data={d}/no_x.npz"],
     "no_x.npz' has no array 'x' (it has: z)"),
    (["--model_path={d}/good.keras", "--locate_overflows", "--data={d}/none.npz"],
     "none.npz': no such file"),
    (["--model_path={d}/good.keras", "--locate_overflows", "--data=inputs.csv"],
     "--data='inputs.csv': give 'synthetic' or a .npz file"),
    (["--model_path={d}/sub.keras", "--import_modules=rewrite.corpus", "--locate_overflows"],
     "the model takes inputs of shape (8,); dataset 'synthetic' has (64,)"),
]


@pytest.fixture(scope="module")
def bad_input_runs(all_runs):
    return all_runs[1]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line(bad_input_runs, case):
    code, stderr = bad_input_runs[case]
    assert code == 2, stderr
    assert BAD_INPUT[case][1] in stderr
    assert "Traceback" not in stderr


def test_a_subclassed_model_is_audited_by_running_it(runs):
    code, stderr, stdout = runs["subclassed"]  # its class imported with --import_modules
    assert code == 0, stderr
    assert "no findings; ran on inputs (1, 8)" in stdout
    table = stdout.split("what ran, layer by layer:")[1]
    assert "block/dense" in table and "block/bn" in table and "head" in table
    code, stderr, _ = runs["subclassed_fix"]
    assert code == 2 and "Traceback" not in stderr
    assert ("cannot write a fixed copy of 'net': it is a SubclassedNet, which Keras re-creates "
            "through its own constructor") in stderr


def test_a_fixed_model_that_still_has_errors_exits_1(files, runs):
    code, stderr, stdout = runs["f16"]
    out = files / "f16_fixed.keras"
    assert code == 1, stderr
    assert f"wrote {out}" in stdout
    fixed_part = stdout.split("audit of the fixed model:")[1]
    assert "variable is float16" in fixed_part and "model output 0" not in fixed_part


def test_locate_overflows_names_the_layer_and_exits_1(runs):
    code, stderr, stdout = runs["locate"]
    assert code == 1, stderr
    assert "float32_layers=['energy']" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("energy "))
    assert "Square made inf/NaN in float16" in row
    code, stderr, stdout = runs["locate_healthy"]
    assert code == 0, stderr
    report = json.loads(stdout[stdout.index("{"):])
    assert report["float32_layers"] == {} and report["policy"] == "mixed_float16"
    assert report["steps"] == 1 and len(report["rows"]) >= 2
