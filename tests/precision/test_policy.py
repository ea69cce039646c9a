"""Policy names, auto, env override, traps, scopes and what Keras builds."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import helpers
import tfmp
from tfmp.precision import HardwareInfo
from tfmp.precision import policy as policy_lib

CPU_BF16 = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))
CPU_PLAIN = HardwareInfo("cpu")
TPU = HardwareInfo("tpu", ("TPU:0",))
V100 = HardwareInfo("gpu", ("GPU:0",), ((7, 0),))
A100 = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))


@pytest.fixture(autouse=True)
def _fresh_warning_memory():
    policy_lib._warn_once.cache_clear()
    yield
    policy_lib._warn_once.cache_clear()


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("mixed_float16", "mixed_float16"),
        ("fp16", "mixed_float16"),
        ("float16", "mixed_float16"),
        ("mixed_bfloat16", "mixed_bfloat16"),
        ("bf16", "mixed_bfloat16"),
        ("bfloat16", "mixed_bfloat16"),
        ("float32", "float32"),
        ("fp32", "float32"),
        (" BF16 ", "mixed_bfloat16"),
    ],
)
def test_names_and_aliases(name, canonical):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tfmp.set_policy(name, hardware=A100) == canonical
    assert keras.config.dtype_policy().name == canonical
    assert tfmp.precision.policy.global_policy_name() == canonical


@pytest.mark.parametrize("bad", ["fp8", "mixed_float32", "", "float64", None, 16])
def test_bad_name_lists_every_accepted_name(bad):
    with pytest.raises(ValueError) as err:
        tfmp.set_policy(bad, hardware=CPU_BF16)
    message = str(err.value)
    assert repr(bad) in message
    for accepted in tfmp.precision.policy.ACCEPTED_NAMES:
        assert accepted in message
    assert keras.config.dtype_policy().name == "float32"  # unchanged


@pytest.mark.parametrize(
    "hw, expected", [(CPU_BF16, "mixed_bfloat16"), (CPU_PLAIN, "float32"),
                     (TPU, "mixed_bfloat16"), (V100, "mixed_float16")]
)
def test_auto_follows_hardware(hw, expected):
    assert tfmp.set_policy("auto", hardware=hw) == expected
    choice = tfmp.resolve_policy("auto", hw)
    assert choice.source == "auto" and choice.reason == hw.reason


def test_auto_on_this_machine_follows_its_cpu_flags():
    # The decision for this machine's own description, stated, not compared with itself.
    flags = tfmp.detect_hardware().cpu_features
    expected = "mixed_bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"
    assert tfmp.set_policy() == expected


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("TFMP_PRECISION", "fp32")
    assert tfmp.set_policy("auto", hardware=CPU_BF16) == "float32"
    assert tfmp.resolve_policy("auto", CPU_BF16).source == "env"
    # An explicit name wins over the environment.
    assert tfmp.set_policy("bf16", hardware=CPU_BF16) == "mixed_bfloat16"
    monkeypatch.setenv("TFMP_PRECISION", "auto")
    assert tfmp.set_policy("auto", hardware=CPU_PLAIN) == "float32"


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv("TFMP_PRECISION", "half")
    with pytest.raises(ValueError, match="TFMP_PRECISION.*'half'.*accepted"):
        tfmp.set_policy("auto", hardware=CPU_BF16)


@pytest.mark.parametrize(
    "name, hw, fragment",
    [
        ("fp16", CPU_BF16, "CPU-only"),
        ("fp16", CPU_PLAIN, "280x"),
        ("fp16", TPU, "on TPU"),
        ("bf16", V100, "below compute capability 8.0"),
    ],
)
def test_trap_warns_once(name, hw, fragment, caplog):
    with pytest.warns(RuntimeWarning, match=fragment):
        tfmp.set_policy(name, hardware=hw)
    # Said once: not also in absl's log (tfmp's binaries show the warning as that one line).
    assert not [r for r in caplog.records if fragment in r.getMessage()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        tfmp.set_policy(name, hardware=hw)


@pytest.mark.parametrize(
    "name, hw",
    [("fp16", V100), ("fp16", A100), ("bf16", A100), ("bf16", TPU),
     ("bf16", CPU_BF16), ("fp32", CPU_PLAIN), ("fp32", TPU)],
)
def test_no_warning_when_not_a_trap(name, hw):
    keras.config.set_dtype_policy("float32" if name != "fp32" else "mixed_bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_to = tfmp.set_policy(name, hardware=hw)
    assert set_to == tfmp.precision.policy.parse_precision(name)  # it did set what was asked
    assert keras.config.dtype_policy().name == set_to


def test_policy_scope_restores_on_exit_and_on_exception():
    keras.config.set_dtype_policy("float32")
    with tfmp.policy_scope("bf16", hardware=CPU_BF16) as name:
        assert name == "mixed_bfloat16"
        assert tfmp.precision.policy.global_policy_name() == "mixed_bfloat16"
    assert tfmp.precision.policy.global_policy_name() == "float32"

    with pytest.raises(RuntimeError, match="boom"):
        with tfmp.policy_scope("bf16", hardware=CPU_BF16):
            raise RuntimeError("boom")
    assert tfmp.precision.policy.global_policy_name() == "float32"

    with pytest.raises(ValueError):
        with tfmp.policy_scope("nope"):
            pass
    assert tfmp.precision.policy.global_policy_name() == "float32"

    # Nested scopes unwind in order.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tfmp.policy_scope("bf16", hardware=CPU_BF16):
            with tfmp.policy_scope("fp16", hardware=V100):
                assert tfmp.precision.policy.global_policy_name() == "mixed_float16"
            assert tfmp.precision.policy.global_policy_name() == "mixed_bfloat16"
    assert tfmp.precision.policy.global_policy_name() == "float32"


@pytest.mark.parametrize(
    "name, compute",
    [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16"), ("float32", "float32")],
)
def test_model_built_under_policy(name, compute):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tfmp.policy_scope(name, hardware=A100):
            model = keras.Sequential(
                [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)]
            )
    for layer in model.layers:
        assert layer.compute_dtype == compute
        assert layer.variable_dtype == "float32"
    assert all(v.dtype == "float32" for v in model.weights)
    out = model(np.ones((3, 4), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == compute


def test_import_without_tensorflow_is_one_clear_line():
    code = "import sys; sys.modules['tensorflow'] = None; import tfmp"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: tfmp needs TensorFlow")
    for extra in ("tfmp[cpu]", "tfmp[gpu]", "tfmp[tpu]"):
        assert extra in last
    assert "tensorflow/" not in proc.stderr  # no traceback from inside TensorFlow


def test_python_m_tfmp_prints_hardware():
    proc = helpers.zygote().run(["-m", "tfmp"], env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    flags = tfmp.detect_hardware().cpu_features
    expected = "mixed_bfloat16" if flags & {"amx_bf16", "avx512_bf16"} else "float32"
    assert f"recommended policy: {expected}" in proc.stdout
