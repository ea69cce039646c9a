"""tfmp.compare_precision and tools/compare.py (in subprocesses)."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
import models
from rewrite import corpus
from tfmp.app import data
from tfmp.measure import compare_precision
from tfmp.measure.stats import batches_phrase
STEPS = 8


@pytest.fixture(scope="module")
def task():
    return data.synthetic("vector", 16, train_examples=256, eval_examples=32)


def _tiny():
    return models.get("mlp")[0](input_shape=(64,), num_classes=10, hidden=(16, 16))


class Fragile(keras.layers.Layer):
    """A deliberately fragile float16 op: a sum of squares of scaled activations
    (about 6e5 here) that float16 (max 65504) cannot hold."""

    def call(self, x):
        energy = keras.ops.sum(keras.ops.square(x * 100.0), axis=-1, keepdims=True)
        return x * keras.ops.sqrt(energy) / 1000.0


def _fragile():
    inputs = keras.Input((64,))
    h = Fragile()(keras.layers.Dense(16, activation="relu")(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def _compare(build, task, **kwargs):
    with warnings.catch_warnings():  # float16 on a CPU: the trap warning
        warnings.simplefilter("ignore")
        return compare_precision(build, task.train, steps=STEPS, **kwargs)


def test_bf16w_trains_with_bfloat16_weights_beside_float32(task):
    result = compare_precision(_tiny, task.train, policies=("fp32", "BF16W"), steps=4)
    assert result.ok, str(result)
    base, weights = result.runs
    assert (weights.label, weights.policy, weights.weights_dtype) == (
        "BF16W", "mixed_bfloat16", "bfloat16")
    assert base.weights_dtype is None and weights.losses != base.losses
    assert json.loads(json.dumps(result.to_dict()))["runs"][1]["weights_dtype"] == "bfloat16"


def test_healthy_model_passes_in_bf16_and_fp16(task):
    result = _compare(_tiny, task, policies=("fp32", "bf16", "fp16"), eval_data=task.eval,
                      metrics=["accuracy"])
    assert result.ok, str(result)
    base, bf16, fp16 = result.runs
    assert [r.policy for r in result.runs] == ["float32", "mixed_bfloat16", "mixed_float16"]
    assert all(len(r.losses) == STEPS and r.skipped_steps == 0 for r in result.runs)
    # Identical weights on identical batches: the first losses agree to 16-bit rounding.
    assert abs(bf16.losses[0] - base.losses[0]) < 1e-2 * base.losses[0]
    assert abs(fp16.losses[0] - base.losses[0]) < 1e-3 * base.losses[0]
    assert fp16.loss_scales[0] == 2.0**15 and bf16.loss_scales[0] == 1.0
    assert set(base.final_metrics) == {"loss", "accuracy"}
    for verdict in result.verdicts:
        assert verdict.max_relative_loss_gap < 0.05
        assert 0.9 < verdict.grad_norm_ratio[1] < 1.1
        assert verdict.throughput_ratio[1] > 0
    json.dumps(result.to_dict())  # serializable
    assert "fp16 (mixed_float16)" in str(result) and "pass" in str(result)


def test_fragile_float16_op_fails_and_bfloat16_passes(task):
    result = _compare(_fragile, task, policies=("fp32", "bf16", "fp16"))
    bf16, fp16 = result.verdicts
    assert bf16.passed and not fp16.passed and not result.ok
    assert "not finite" in fp16.reason and fp16.max_relative_loss_gap == float("inf")
    assert result.runs[2].skipped_steps == STEPS  # the guard kept every step out
    assert result.to_dict()["verdicts"][1]["max_relative_loss_gap"] == "inf"


def test_a_tight_tolerance_fails_on_drift(task):
    result = _compare(_tiny, task, policies=("fp32", "bf16"), tolerance=1e-9)
    assert not result.ok and "above the tolerance 1e-09" in result.verdicts[0].reason


@pytest.mark.parametrize("kwargs, fragment", [
    ({"policies": ("fp32",)}, "give a baseline and at least one more"),
    ({"policies": ("fp32", "fp8")}, "Unknown precision 'fp8'"),
    ({"steps": 2}, "steps=2 must be an integer above 2"),
    ({"tolerance": 0.0}, "tolerance=0.0 must be a positive number"),
    ({"steps": 1000}, "the dataset gave 4 batches; steps=1000"),
])
def test_bad_arguments(task, kwargs, fragment):
    finite = data.synthetic("vector", 16, train_examples=64, eval_examples=64).eval  # 4 batches
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        compare_precision(_tiny, finite, **{"policies": ("fp32", "bf16"), **kwargs})


TOOL_BAD_INPUT = [
    (["--policies=fp32,fp17"], "Unknown precision 'fp17'"),  # the library's check, one line
    (["--model=mlp", "--model_path=x.keras"], "give --model or --model_path, not both"),
    # a vector model (synthetic image data is 8192 images to make: ~2 s for a refusal)
    (["--model_path={tmp}/narrow.keras"], "the model takes inputs of shape (16,); dataset "
                                          "'synthetic' has (64,)"),
]


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory):
    """tools/compare end to end, on a saved model, and on bad input: every run through the
    binary's entry point, all in one child process (TensorFlow imported once)."""
    tmp = tmp_path_factory.mktemp("compare_tool")
    keras.utils.set_random_seed(0)
    compiled = _tiny()
    compiled.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    compiled.save(tmp / "m.keras")
    models.get("mlp")[0](input_shape=(16,), num_classes=10, hidden=(8,)).save(tmp / "narrow.keras")
    subclassed = corpus.SubclassedNet(classes=10, name="net")
    subclassed(np.zeros((1, data.VECTOR_DIM), "float32"))
    subclassed.save(tmp / "sub.keras")
    (tmp / "sub").mkdir()  # a previous comparison, and a file of the user's
    for name, content in EARLIER_COMPARISON.items():
        (tmp / "sub" / name).write_bytes(content)
    sub = [f"--model_path={tmp / 'sub.keras'}", "--import_modules=rewrite.corpus", "--steps=4",
           "--batch_size=16", "--policies=fp32,bf16", f"--output_dir={tmp}/sub"]
    cases = [
        ["--steps=6", "--batch_size=16", "--policies=fp32,BF16", f"--output_dir={tmp}/e2e"],
        [f"--model_path={tmp / 'm.keras'}", "--steps=6", "--batch_size=16",
         "--policies=fp32,bf16", "--tolerance=1e-9", f"--output_dir={tmp}/saved"],
        sub,  # refused: the folder holds a previous comparison
        [*sub, "--overwrite"],
    ] + [[*(a.format(tmp=tmp) for a in args), f"--output_dir={tmp}/bad"]
         for args, _ in TOOL_BAD_INPUT]
    runs = helpers.run_tool_cases("compare", cases, stdout=True,
                                  PYTHONPATH=os.path.join(helpers.ROOT, "tests"))
    return tmp, {"e2e": runs[0], "saved": runs[1], "refused": runs[2], "subclassed": runs[3],
                 "bad": runs[4:]}


EARLIER_COMPARISON = {"compare.json": b'{"earlier": 1}', "compare.png": b"an earlier plot",
                      "notes.txt": b"the user's"}


def test_tool_end_to_end(tool_runs):
    tmp, runs = tool_runs
    code, stderr, stdout = runs["e2e"]
    assert code == 0, stderr[-2000:]
    assert "bf16 (mixed_bfloat16)" in stdout.lower() and "pass" in stdout
    out = tmp / "e2e"
    report = json.loads((out / "compare.json").read_text())
    assert report["ok"] and len(report["runs"]) == 2 and len(report["runs"][0]["losses"]) == 6
    assert report["loss"] == ("SparseCategoricalCrossentropy(from_logits=True): logits output "
                              "('logits' applies no softmax or sigmoid)")
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert oct((out / "compare.json").stat().st_mode & 0o777) != oct(0o600)
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.png"]
    # Each phase after training says what it does, in one log line
    for phase in ["training fp32, BF16 for 6 steps, taking turns step by step",
                  "evaluating fp32 (float32) on 64 batches",  # 1024 examples, batches of 16
                  "evaluating BF16 (mixed_bfloat16) on 64 batches",
                  f"writing {out}/compare.json", f"drawing {out}/compare.png"]:
        assert len([line for line in stderr.splitlines() if line.endswith(phase)]) == 1, phase


def test_tool_on_a_saved_model_and_a_failing_verdict(tool_runs):
    tmp, runs = tool_runs
    code, stderr, stdout = runs["saved"]
    assert code == 1, stderr[-2000:]
    assert "FAIL" in stdout and "above the tolerance" in stdout
    assert ("loss: SparseCategoricalCrossentropy(from_logits=True): the model's compiled loss"
            in stdout.splitlines())
    assert (tmp / "saved" / "compare.json").exists()


def test_tool_on_a_saved_subclassed_model(tool_runs):
    tmp, runs = tool_runs
    code, stderr, stdout = runs["subclassed"]  # each policy loads its own copy of the file
    assert code == 0, stderr[-2000:]
    report = json.loads((tmp / "sub" / "compare.json").read_text())
    assert [r["policy"] for r in report["runs"]] == ["float32", "mixed_bfloat16"]
    assert report["runs"][0]["losses"][0] == pytest.approx(report["runs"][1]["losses"][0], rel=0.02)


def test_tool_never_silently_replaces_a_previous_comparison(tool_runs):
    tmp, runs = tool_runs
    code, stderr, _ = runs["refused"]
    assert code == 2 and "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if "error:" in line]
    assert line.endswith(f"--output_dir='{tmp}/sub' holds a previous result (compare.json, "
                         f"compare.png): give --overwrite to move it into {tmp}/sub/previous."
                         "<date>-<time>/ (nothing is deleted), or another --output_dir"), line
    assert "evaluating" not in stderr  # refused before any work
    # --overwrite: the previous comparison moved aside whole, the user's file left alone
    code, stderr, _ = runs["subclassed"]
    (previous,) = (tmp / "sub").glob("previous.*")
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == {
        n: c for n, c in EARLIER_COMPARISON.items() if n != "notes.txt"}
    assert sorted(p.name for p in (tmp / "sub").iterdir()) == [
        "compare.json", "compare.png", "notes.txt", previous.name]
    assert (tmp / "sub" / "notes.txt").read_bytes() == EARLIER_COMPARISON["notes.txt"]
    assert f"moved the previous result in {tmp}/sub (compare.json, compare.png) to {previous}" \
        in stderr, stderr[-2000:]


def test_tool_bad_input_is_one_line(tool_runs):
    _, runs = tool_runs
    for (args, fragment), (code, stderr, _) in zip(TOOL_BAD_INPUT, runs["bad"]):
        assert code == 2 and "Traceback" not in stderr, (args, stderr)
        assert fragment in stderr, (args, stderr)


def test_progress_lines_count_the_batches_without_reading_them():
    ds = tf.data.Dataset.range(10).batch(3)
    assert [batches_phrase(ds), batches_phrase(ds, 2), batches_phrase([(1, 2)])] == [
        "4 batches", "2 batches", "1 batch"]
    endless = ds.repeat()
    assert [batches_phrase(endless), batches_phrase(endless, 5), batches_phrase(iter([]))] == [
        "every batch", "up to 5 batches", "every batch"]
