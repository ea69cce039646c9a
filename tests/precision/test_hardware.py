"""The auto table, driven by fake HardwareInfo values, and real detection."""

import dataclasses

import pytest
import tensorflow as tf

import tfmp
from tfmp.precision import HardwareInfo
from tfmp.precision.hardware import read_cpu_features, recommend_policy


@pytest.mark.parametrize(
    "hw, expected",
    [
        (HardwareInfo("tpu", ("TPU:0",)), "mixed_bfloat16"),
        (HardwareInfo("gpu", ("GPU:0",), ((8, 0),)), "mixed_bfloat16"),
        (HardwareInfo("gpu", ("GPU:0", "GPU:1"), ((9, 0), (8, 6))), "mixed_bfloat16"),
        (HardwareInfo("gpu", ("GPU:0",), ((7, 0),)), "mixed_float16"),
        (HardwareInfo("gpu", ("GPU:0",), ((7, 5),)), "mixed_float16"),
        # Mixed fleet: one V100 next to an A100 -> the slowest decides.
        (HardwareInfo("gpu", ("GPU:0", "GPU:1"), ((8, 0), (7, 0))), "mixed_float16"),
        (HardwareInfo("gpu", ("GPU:0",), ((6, 1),)), "float32"),
        (HardwareInfo("gpu", ("GPU:0", "GPU:1"), ((8, 0), (6, 0))), "float32"),
        (HardwareInfo("gpu", ("GPU:0",), (None,)), "float32"),
        (HardwareInfo("cpu", (), (), frozenset({"amx_bf16"})), "mixed_bfloat16"),
        (HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"})), "mixed_bfloat16"),
        (HardwareInfo("cpu", (), (), frozenset({"avx512_fp16"})), "float32"),
        (HardwareInfo("cpu"), "float32"),
        # A GPU host's CPU flags do not matter: training runs on the GPU.
        (HardwareInfo("gpu", ("GPU:0",), ((6, 0),), frozenset({"amx_bf16"})), "float32"),
    ],
)
def test_auto_table(hw, expected):
    policy, reason = recommend_policy(hw)
    assert policy == expected
    assert hw.recommended_policy == expected
    assert hw.reason == reason and reason.endswith(".")


def test_hardware_info_is_frozen_and_validated():
    hw = HardwareInfo("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.accelerator = "gpu"  # type: ignore[misc]
    with pytest.raises(ValueError, match="'npu'"):
        HardwareInfo("npu")
    with pytest.raises(ValueError, match="avx9"):
        HardwareInfo("cpu", cpu_features=frozenset({"avx9"}))


def test_read_cpu_features(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n"
    )
    assert read_cpu_features(str(path)) == {"avx512_bf16", "amx_bf16"}
    assert read_cpu_features(str(tmp_path / "missing")) == frozenset()


def test_detect_hardware_on_this_machine():
    hw = tfmp.detect_hardware()
    # What TensorFlow sees here decides the expectation, not the machine this was written on.
    kind = next((k for k in ("tpu", "gpu") if tf.config.list_physical_devices(k.upper())), "cpu")
    assert hw.accelerator == kind
    assert hw.devices and all(kind.upper() in d for d in hw.devices)
    assert hw.cpu_features == read_cpu_features()
    if kind == "cpu":
        bf16 = bool(hw.cpu_features & {"amx_bf16", "avx512_bf16"})
        assert hw.recommended_policy == ("mixed_bfloat16" if bf16 else "float32")
    text = hw.describe()
    assert hw.recommended_policy in text and hw.reason in text


def test_detect_hardware_reads_the_given_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text("flags : avx512_fp16\n")
    hw = tfmp.detect_hardware(cpuinfo_path=str(tmp_path / "cpuinfo"))
    assert hw.cpu_features == {"avx512_fp16"}
    assert hw.recommended_policy == "float32"
