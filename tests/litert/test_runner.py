"""tfmp.litert.Runner: the same LiteRT file through LiteRT's interpreter and tf.lite's."""

import keras
import numpy as np
import pytest

import tfmp
from tfmp.litert import Runner


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10)])
    directory = tmp_path_factory.mktemp("litert")
    x = np.random.RandomState(0).rand(64, 16).astype("float32")
    tfmp.export(model, str(directory / "f16.tflite"), "float16")
    tfmp.export(model, str(directory / "int8.tflite"), "full_int8", calibration_data=x)
    return directory, x


def test_both_runtimes_run_the_same_file(exported):
    directory, x = exported
    path = str(directory / "f16.tflite")
    litert, tf_lite = Runner(path, "litert"), Runner(path, "tf")
    assert (litert.runtime, tf_lite.runtime) == ("litert", "tf")
    np.testing.assert_allclose(litert(x), tf_lite(x), rtol=1e-5, atol=1e-5)
    assert litert(x[:3]).shape == (3, 10)  # the batch size can change between calls
    assert litert(x).shape == (64, 10)
    assert litert.ops["FULLY_CONNECTED"] == 2 and litert.float_ops["FULLY_CONNECTED"] == 2


def test_an_int8_model_has_no_float_op_but_its_edges(exported):
    directory, x = exported
    runner = Runner(str(directory / "int8.tflite"))
    assert runner.ops["QUANTIZE"] == 1 and runner.ops["DEQUANTIZE"] == 1
    assert runner.float_ops == {}  # QUANTIZE / DEQUANTIZE do not count
    assert runner(x).dtype == np.float32  # the interface stays float32


def test_an_unknown_runtime_is_one_line(exported):
    directory, _ = exported
    with pytest.raises(ValueError, match="Unknown runtime 'onnx'; accepted: auto, litert, tf"):
        Runner(str(directory / "f16.tflite"), "onnx")
