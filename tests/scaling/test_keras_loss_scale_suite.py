"""Keras' own LossScaleOptimizer tests (its installed loss_scale_optimizer_test.py), run on
tfmp.DynamicLossScaleOptimizer (tests/keras_suite.py), and that helper's own checks."""

import keras
import pytest

import keras_suite
import tfmp

KERAS, TFMP = keras.optimizers.LossScaleOptimizer, tfmp.DynamicLossScaleOptimizer
# What tfmp changes on purpose (README: "Deviations from the stock class, on purpose"). Each
# must fail with Keras' assertion (strict xfail): with Keras' own class both pass, so the
# pair also fails the suite if the copy silently ran Keras' class.
SUITE = keras_suite.load(KERAS, TFMP, deselect={
    # Keras refuses dynamic=False; tfmp takes it: a fixed scale that still skips and counts
    # non-finite steps (the NaN guard under bf16 / float32).
    "test_init_dynamic_arg": "dynamic=False is a fixed scale, not an error",
    # Keras' config has exactly its four keys; tfmp's adds growth_factor, backoff_factor,
    # min_scale, max_scale, hysteresis and dynamic (a stock config still loads: test_optimizer).
    "test_serialization": "the config adds tfmp's six arguments to Keras' four",
})
globals().update(SUITE.cases)


def test_keras_tests_run_on_tfmps_class_on_tensorflow():
    keras_suite.check(SUITE, TFMP)
    assert SUITE.module.LossScaleOptimizer is TFMP  # `from ... import LossScaleOptimizer`


def test_a_keras_file_that_no_longer_names_the_class_fails_loudly():
    with pytest.raises(ValueError, match="never names Adam: nothing to replace"):
        keras_suite.load(keras.optimizers.Adam, TFMP, {}, path=keras_suite.keras_test_file(KERAS))


def test_a_deselected_test_keras_dropped_fails_loudly():
    with pytest.raises(ValueError, match="'test_gone' is not in .*loss_scale_optimizer_test.py"):
        keras_suite.load(KERAS, TFMP, {"test_gone": "why"})
