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
    # one died minutes later in another test, and its destructor (`~RootDataset::Iterator`,
    # native stack in issue 17's note) waited 14-40 s, the CPU idle, for tf.data's
    # autotuning thread, whose sleep between runs grows with the iterator's age (to 60 s).
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    gc.freeze()


# The longest modules first, the rest in file order: each module runs on one of the two
# workers (--dist loadscope), so a long one started last would leave the other worker idle at
# the end. The figures: a module's test seconds added up, the mean of two full -n 2 runs on the
# 2-core AVX-512 EPYC with other suites beside them (from run to run they vary by half).
LONGEST_FIRST = (
    "rewrite/test_model_kinds.py",  # ~68
    "tools/test_train.py",  # ~39: the binary's runs in one child, a kill and a resume
    "scaling/test_accumulation.py",  # ~37
    "distribute/test_multi_worker.py",  # ~33 (one run): two-worker clusters
    "tools/test_train_user.py",  # ~32: the user's models and data, many runs
    "measure/test_tuning.py",  # ~29: XLA compiles
    "litert/test_conversion.py",  # ~29
    "rewrite/test_overflows.py",  # ~24
    "test_models.py",  # ~21
    "compensation/test_compensating_optimizer.py",  # ~21
    "measure/test_comparison.py",  # ~21
    "tools/test_train_run_dir.py",  # ~20
    "tools/test_export.py",  # ~20
    "callbacks/test_events.py",  # ~20: NanMonitor's replays, fits of tiny models
    "scaling/test_optimizer.py",  # ~18
    "weights/test_half.py",  # ~18
    "tools/test_user_results.py",  # ~17: a user run trained, exported, compared
    "callbacks/test_monitors.py",  # ~17
    "scaling/test_replicas.py",  # ~17
    "callbacks/test_backup.py",  # ~17
    "test_benchmarks.py",  # ~16
    "measure/test_losses.py",  # ~16
    "scaling/test_state_guard.py",  # ~15
    "rewrite/test_preparation.py",  # ~14
    "app/test_training.py",  # ~12
    "tools/test_train_weights.py",  # ~11: two runs of the binary side by side, one killed
    "app/test_flags.py",  # ~4: the README's binary as a process
)


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: file order within a rank
