"""Strategy names, the auto decision (fake hardware) and what runs here."""

import pytest
import tensorflow as tf

import tfmp
from tfmp.precision import HardwareInfo
from tfmp.distribute.strategies import choose_strategy


@pytest.mark.parametrize("hw, tpu, expected", [
    (HardwareInfo("tpu", ("TPU:0",)), None, "tpu"),
    (HardwareInfo("cpu"), "grpc://10.0.0.2:8470", "tpu"),
    (HardwareInfo("gpu", ("GPU:0", "GPU:1"), ((8, 0), (8, 0))), None, "mirrored"),
    (HardwareInfo("gpu", ("GPU:0",), ((8, 0),)), None, "one_device"),
    (HardwareInfo("cpu", ("CPU:0",)), None, "one_device"),
])
def test_auto_decision(hw, tpu, expected):
    assert choose_strategy(hw, tpu) == expected


@pytest.mark.parametrize("name, canonical", [
    ("auto", "auto"), ("off", "default"), ("MIRRORED", "mirrored"),
    ("multi_worker", "multi_worker_mirrored"), ("tpu", "tpu")])
def test_names(name, canonical):
    assert tfmp.distribute.strategies.parse_strategy(name) == canonical


def test_bad_name_lists_accepted():
    with pytest.raises(ValueError, match="'ps'.*auto, default, one_device, mirrored"):
        tfmp.get_strategy("ps")


def test_strategies_available_on_cpu():
    assert tfmp.get_strategy("default") is tf.distribute.get_strategy()
    one = tfmp.get_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    # auto follows the hardware TensorFlow sees (one device on a CPU-only host).
    expected = {"one_device": tf.distribute.OneDeviceStrategy,
                "mirrored": tf.distribute.MirroredStrategy}[choose_strategy(tfmp.detect_hardware())]
    assert isinstance(tfmp.get_strategy("auto"), expected)
    mirrored = tfmp.get_strategy("mirrored")  # the two logical CPUs of conftest
    assert mirrored.num_replicas_in_sync == 2


def test_tpu_without_tpu_is_one_clear_error():
    with pytest.raises(ValueError) as err:
        tfmp.get_strategy("tpu")
    assert str(err.value).startswith("No TPU found at tpu='local'")
    assert "\n" not in str(err.value)


def test_split_cpu_after_init_is_a_clear_error():
    with pytest.raises(ValueError, match="already initialized"):
        tfmp.split_cpu(3)
    tfmp.split_cpu(2)  # what conftest set: nothing to do
    with pytest.raises(ValueError, match="positive integer"):
        tfmp.split_cpu(0)
