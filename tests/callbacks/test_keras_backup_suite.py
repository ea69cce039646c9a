"""Keras' own BackupAndRestore tests (its installed backup_and_restore_test.py), run on
tfmp.callbacks.SafeBackupAndRestore (tests/keras_suite.py)."""

import keras

import keras_suite
from tfmp.callbacks import SafeBackupAndRestore

# Nothing deselected: every Keras test passes on SafeBackupAndRestore.
SUITE = keras_suite.load(keras.callbacks.BackupAndRestore, SafeBackupAndRestore, deselect={})
globals().update(SUITE.cases)


def test_keras_tests_run_on_tfmps_class_on_tensorflow():
    keras_suite.check(SUITE, SafeBackupAndRestore)
