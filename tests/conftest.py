"""Shared test set-up: two logical CPU devices (for MirroredStrategy tests) and
a float32 global policy restored around every test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import pytest
import tensorflow as tf

# Must happen before TensorFlow initializes its devices.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture(autouse=True)
def _float32_policy_and_clean_env(monkeypatch):
    """Each test starts in float32, without TFMP_PRECISION, and is restored after."""
    monkeypatch.delenv("TFMP_PRECISION", raising=False)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    # Keras' state reset without its forced gc.collect(): that took 0.2-0.5 s after every
    # test (a third of the suite's time); Python's own collector still runs.
    keras.backend.clear_session(free_memory=False)
