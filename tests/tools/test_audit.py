"""tools/audit.py end to end, in subprocesses."""

import os

import keras
import numpy as np
import pytest

import helpers
from rewrite import corpus
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
    ], stdout=True, PYTHONPATH=os.path.join(ROOT, "tests"))
    names = ("good", "bad", "fix", "fixed", "f16", "subclassed", "subclassed_fix")
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
