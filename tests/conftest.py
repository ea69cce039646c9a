"""Shared test set-up: two logical CPU devices (for MirroredStrategy tests) and
a float32 global policy restored around every test."""

import gc
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest


def pytest_configure(config):
    """Two logical CPUs, before TensorFlow initializes its devices; not in pytest-xdist's
    controller, which runs no test (importing TensorFlow there took 6 s before any worker
    started)."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_basetemp(tmp_path_factory):
    """TMPDIR (this process's and its children's) under pytest's basetemp, which pytest
    prunes: what a killed process cannot delete (autograph's files, a worker's scratch
    directory, a half-written save's) and what libraries leave (Keras' asset directory after
    a failed save, tensorflow-datasets' empty ones) no longer piles up in /tmp."""
    path = str(tmp_path_factory.mktemp("tmpdir"))
    with pytest.MonkeyPatch.context() as patch:  # both put back at the session's end
        patch.setenv("TMPDIR", path)
        patch.setattr(tempfile, "tempdir", path)
        yield


@pytest.fixture(autouse=True)
def _float32_policy_and_clean_env(monkeypatch):
    """Each test starts in float32, without TFMP_PRECISION, and is restored after."""
    import keras

    monkeypatch.delenv("TFMP_PRECISION", raising=False)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    # Keras' state reset without its own gc.collect(), which scans the whole heap (0.3-1
    # million objects, 0.2-0.5 s after every test). Instead this test's garbage is collected
    # here and what survives is frozen (never scanned again), so this collection and Python's
    # own ones scan only the objects made since the last test (a few ms). And the tf.data
    # iterators a test leaves in reference cycles die at its end: left to Python's collector,
    # one died minutes later in another test, and its destructor (`~RootDataset::Iterator`)
    # waited tens of seconds, the CPU idle, for tf.data's autotuning thread, whose sleep
    # between runs grows with the iterator's age (to 60 s).
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    gc.freeze()


# The longest modules first (measured: their test seconds added up, `pytest --durations=0`;
# measure again when a module grows), the rest in file order: each module runs on one of the
# two workers (--dist loadscope), so a long one started last would leave the other worker
# idle at the end. The guides' examples (conftest.py at the root) are modules too.
LONGEST_FIRST = (
    "rewrite/test_model_kinds.py",
    "tools/test_train.py",  # the binary's runs in one child, a kill and a resume
    "scaling/test_accumulation.py",
    "distribute/test_multi_worker.py",  # two-worker clusters
    "tools/test_train_user.py",  # the user's models and data, many runs
    "litert/test_conversion.py",
    "measure/test_tuning.py",  # XLA compiles
    "rewrite/test_overflows.py",
    "test_models.py",
    "compensation/test_compensating_optimizer.py",
    "measure/test_comparison.py",
    "docs/binaries.md",  # the binary's runs, a user model and data, my_train.py
    "tools/test_train_run_dir.py",
    "tools/test_export.py",
    "callbacks/test_events.py",  # NanMonitor's replays, fits of tiny models
    "scaling/test_optimizer.py",
    "weights/test_half.py",
    "tools/test_user_results.py",  # a user run trained, exported, compared
    "callbacks/test_monitors.py",
    "scaling/test_replicas.py",
    "callbacks/test_backup.py",
    "test_benchmarks.py",
    "measure/test_losses.py",
    "scaling/test_state_guard.py",
    "test_preparation.py",
    "app/test_training.py",
    "tools/test_train_weights.py",  # two runs of the binary side by side, one killed
    "app/test_flags.py",  # the guide's binary as a process
)


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: file order within a rank
