"""benchmarks/: the interleaved rotation, the ratio summary, and tools/bench end to end."""

import json

import pytest

import helpers
import tfmp
from tfmp.precision import HardwareInfo

from benchmarks import interleave


def test_variants_take_turns_and_warmup_is_dropped():
    calls = []

    def block(name, seconds):
        def run():
            calls.append(name)
            return seconds + len(calls)  # a machine that slows down round after round
        return run

    times = interleave.interleaved({"a": block("a", 0.0), "b": block("b", 0.0)}, rounds=3,
                                   warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # who goes first rotates
    assert times == {"a": [4, 5, 8], "b": [3, 6, 7]}  # the warm-up round is not kept


def test_ratio_summary_is_the_median_of_per_round_ratios():
    median, q1, q3 = interleave.ratio_summary([2.0, 4.0, 6.0, 8.0, 10.0], [1.0] * 5)
    assert (median, q1, q3) == (6.0, 4.0, 8.0)
    # A drift that hits both arms of a round alike cancels out of the ratio.
    median, _, _ = interleave.ratio_summary([1.0, 2.0, 4.0], [2.0, 4.0, 8.0])
    assert median == pytest.approx(0.5)


def test_activation_bytes_halve_under_bfloat16_except_float32_layers():
    import keras

    import models
    from benchmarks import bench

    def mlp(policy):
        keras.config.set_dtype_policy(policy)
        model = models.get("mlp")[0](hidden=(32, 32))
        keras.config.set_dtype_policy("float32")
        return model

    f32, bf16 = bench.activation_bytes(mlp("float32"), 4), bench.activation_bytes(mlp("mixed_bfloat16"), 4)
    # input 64 (float32 in both), hidden 32 + 32 (float32: 4 bytes, bf16: 2), logits 10 (float32)
    assert f32 == 4 * 4 * (64 + 32 + 32 + 10)
    assert bf16 == 4 * (4 * 64 + 2 * (32 + 32) + 4 * 10)


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """tools/bench end to end and on a bad variant, through the binary's entry point, in one
    child process (which spawns a process per variant)."""
    tmp = tmp_path_factory.mktemp("bench")
    runs = helpers.run_tool_cases("bench", [
        ["--models=mlp", "--sizes=default", "--batch_size=32",
         "--variants=keras_fp16,tfmp_auto_guarded", "--rounds=2", "--warmup=1",
         "--block_seconds=0.02", f"--output={tmp}/bench.json"],
        ["--variants=float32,fp8", f"--output={tmp}/b.json"],
    ], stdout=True)
    return tmp, runs


def test_tool_end_to_end_with_a_process_per_variant(bench_runs):
    tmp, ((code, stderr, stdout), _) = bench_runs
    assert code == 0, stderr[-2000:]
    report = json.loads((tmp / "bench.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["float32", "keras_fp16", "tfmp_auto_guarded"]
    assert rows["keras_fp16"]["note"].startswith("skipped: mixed_float16 on a CPU-only host")
    auto = tfmp.detect_hardware().recommended_policy  # mixed_bfloat16 only where the CPU has bf16
    assert rows["tfmp_auto_guarded"]["policy"] == auto
    assert rows["float32"]["speed_wall"] == [1.0, 1.0, 1.0]
    for r in (rows["float32"], rows["tfmp_auto_guarded"]):
        assert r["speed_wall"][1] > 0 and r["speed_cpu"][1] > 0 and r["peak_rss"] > 100e6
        assert r["steps_per_block"] >= 3 and r["emulated"] is None  # auto is never emulated
        assert r["peak_device_memory"] is None  # no GPU here
    memory = rows["tfmp_auto_guarded"]["activation_bytes_vs_float32"]
    assert memory < 1.0 if auto == "mixed_bfloat16" else memory == 1.0
    assert f"| mlp | default | tfmp_auto_guarded | {auto} |" in stdout
    assert "--variants=keras_fp16,tfmp_auto_guarded" in report["command"]
    hw = tfmp.detect_hardware()
    assert f"auto here: {auto} ({hw.reason})" in stdout  # why auto is what it is
    # keras_fp16 would be emulated here, but it is skipped: no row is marked, so no footnote.
    assert rows["keras_fp16"]["emulated"] and "(emulated)" not in stdout
    # Each phase says what it does, a line per variant.
    said = [l.split("] ", 1)[-1] for l in stderr.splitlines() if "bench: mlp (default)" in l]
    assert said[:5] == [
        "bench: mlp (default) keras_fp16: " + rows["keras_fp16"]["note"],
        "bench: mlp (default): starting float32, tfmp_auto_guarded, a process each (import, "
        "build, warm-up)",
        f"bench: mlp (default) float32 ready: policy float32, "
        f"{rows['float32']['steps_per_block']} steps per block",
        f"bench: mlp (default) tfmp_auto_guarded ready: policy {auto}, "
        f"{rows['tfmp_auto_guarded']['steps_per_block']} steps per block",
        "bench: mlp (default): measuring 2 rounds (after 1 warm-up), one block per variant each"]
    assert said[5:] == [f"bench: mlp (default) {v}: {rows[v]['speed_wall'][0]:.2f}x float32 "
                        f"(wall clock), {rows[v]['step_ms']:.1f} ms per step"
                        for v in ("float32", "tfmp_auto_guarded")]


CPU_BF16 = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))
CPU_AMX = HardwareInfo("cpu", (), (), frozenset({"amx_bf16"}))
CPU_AVX2 = HardwareInfo("cpu", (), (), frozenset())
T4 = HardwareInfo("gpu", ("GPU:0",), ((7, 5),), frozenset())
A100 = HardwareInfo("gpu", ("GPU:0",), ((8, 0),), frozenset())


@pytest.mark.parametrize("variant,hardware,expected", [
    ("keras_bf16", CPU_AVX2, "bfloat16 is emulated on this CPU"),
    ("tf_rewrite", CPU_AVX2, "bfloat16 is emulated on this CPU"),
    ("keras_bf16", CPU_BF16, None),
    ("keras_bf16", CPU_AMX, None),
    ("tfmp_auto", CPU_AVX2, None),  # auto is float32 there
    ("tfmp_auto_guarded", CPU_BF16, None),  # auto is bfloat16 there, natively
    ("float32", CPU_AVX2, None),
    ("keras_fp16", CPU_BF16, "float16 is emulated on CPUs"),
    ("keras_bf16", T4, "bfloat16 is emulated on GPUs below compute capability 8.0"),
    ("keras_bf16", A100, None),
    ("tfmp_auto", T4, None),  # auto is mixed_float16 on a T4
    ("tfmp_bf16_weights", CPU_AVX2, "bfloat16 is emulated on this CPU"),
    ("tfmp_bf16_weights", CPU_BF16, None),
])
def test_emulated_variants_are_named(variant, hardware, expected):
    from benchmarks import bench

    reason = bench.emulated(variant, hardware)
    assert (reason is None) if expected is None else reason.startswith(expected)


def test_the_bf16_weights_variant_stores_bfloat16_weights_and_compensates():
    import keras

    from benchmarks import bench
    from tfmp.compensation import CompensatedOptimizer

    model, _, policy = bench._build(bench.Spec("mlp", "default", "tfmp_bf16_weights", 8, 0.1))
    assert policy == "mixed_bfloat16" and isinstance(model.optimizer, CompensatedOptimizer)
    assert {v.dtype for v in model.trainable_variables if "logits" not in v.path} == {"bfloat16"}
    keras.config.set_dtype_policy("float32")


def test_peak_device_memory_is_read_on_a_gpu_only():
    from benchmarks import bench

    asked = []

    def read(device):
        asked.append(device)
        return {"current": 10, "peak": 3 << 20}

    assert bench.peak_device_memory(A100, read) == 3 << 20 and asked == ["GPU:0"]
    assert bench.peak_device_memory(CPU_BF16, read) is None and asked == ["GPU:0"]


def test_the_table_labels_emulated_variants_and_shows_device_memory():
    from benchmarks import bench

    def row(variant, emulated=None, device=None):
        return {"model": "cnn", "size": "default", "variant": variant, "policy": "p",
                "emulated": emulated, "speed_wall": [0.5, 0.4, 0.6], "speed_cpu": [0.5] * 3,
                "step_ms": 1.0, "peak_rss_vs_float32": 1.0, "training_rss_vs_float32": 1.0,
                "activation_bytes_vs_float32": 0.5, "peak_device_memory": device,
                "peak_device_memory_vs_float32": None if device is None else 0.6}

    rows = [row("float32"), row("keras_bf16", "bfloat16 is emulated")]
    table = bench.markdown_table(rows)
    assert "| cnn | default | keras_bf16 | p (emulated) | 0.50x (0.40-0.60) |" in table
    assert "| cnn | default | float32 | p | " in table and "device memory" not in table
    assert bench.footnotes(rows) == [
        "(emulated): bfloat16 is emulated; its blocks run as few steps as the timing needs"]
    # Not measured (skipped, or failed): the table marks nothing, and no footnote explains it.
    skipped = {"model": "cnn", "size": "default", "variant": "keras_fp16", "policy": "-",
               "note": "skipped: a trap", "emulated": "float16 is emulated"}
    assert "(emulated)" not in bench.markdown_table([rows[0], skipped])
    assert bench.footnotes([rows[0], skipped]) == []
    table = bench.markdown_table([row("float32", device=10), row("keras_bf16", device=6)])
    assert table.splitlines()[0].endswith("| peak device memory |")
    assert table.splitlines()[-1].endswith("| 0.50x | 0.60x |")


def test_tool_bad_variant_is_one_line(bench_runs):
    _, (_, (code, stderr, _)) = bench_runs
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        "bench.py: error: --variants=float32,fp8: fp8 not accepted; accepted: float32, "
        "keras_bf16, keras_fp16, tf_rewrite, tfmp_auto, tfmp_auto_guarded, tfmp_bf16_weights")
