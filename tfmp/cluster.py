"""A multi-worker cluster from `TF_CONFIG`: checked, connected with a timeout, and who writes what.

TensorFlow reads the cluster from the `TF_CONFIG` environment variable (a JSON
object: `{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}`, optionally with one `"chief"` entry). `read_tf_config` checks it
and says in one line what is wrong; `connect` builds the
`MultiWorkerMirroredStrategy` and gives up after a timeout instead of waiting
forever for a worker that never comes; `write_dirs` follows TensorFlow's
multi-worker guide: the chief writes to the real directory, the other workers
to temporary ones, and every worker restores from the chief's backup
(`ChiefBackupAndRestore`), so a restarted cluster resumes in step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import subprocess
import tempfile
from typing import Mapping, Optional

import keras
import tensorflow as tf

ENV = "TF_CONFIG"
DEFAULT_TIMEOUT = 120.0  # seconds to wait for every worker of the cluster


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker cluster.

    Attributes:
        addresses: `host:port` of every task, the chief (if any) first.
        task_type: `"worker"` or `"chief"`.
        task_index: Index within its type.
    """

    addresses: tuple[str, ...]
    task_type: str
    task_index: int
    has_chief: bool = False

    @property
    def num_workers(self) -> int:
        return len(self.addresses)

    @property
    def is_chief(self) -> bool:
        """The task that writes the run's files (TensorFlow's rule)."""
        return self.task_type == "chief" or (not self.has_chief and self.task_index == 0)

    @property
    def address(self) -> str:
        return self.addresses[self.task_index + (1 if self.has_chief and
                                                 self.task_type == "worker" else 0)]

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_index}"


def read_tf_config(environ: Mapping[str, str] = os.environ) -> Optional[Cluster]:
    """The cluster `TF_CONFIG` describes, or None when it is unset or empty.

    Raises:
        ValueError: malformed JSON, no `worker` list, a task type or index that is
            not in the cluster (one line naming the value).
    """
    raw = environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not valid JSON ({e.msg} at character {e.pos}): {raw[:80]!r}")
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    chief = cluster.get("chief", []) if isinstance(cluster, dict) else []
    if (not isinstance(workers, list) or not isinstance(chief, list) or len(chief) > 1
            or not all(isinstance(a, str) and ":" in a for a in workers + chief)):
        raise ValueError(f"{ENV} needs \"cluster\": {{\"worker\": [\"host:port\", ...]}} (and at "
                         f"most one \"chief\"); got {json.dumps(cluster)}")
    if not isinstance(task, dict) or task.get("type") not in ("worker", "chief"):
        raise ValueError(f"{ENV} needs \"task\": {{\"type\": \"worker\", \"index\": i}}; got "
                         f"{json.dumps(task)}")
    size = len(workers) if task["type"] == "worker" else len(chief)
    index = task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ValueError(f"{ENV} task index {index!r} is outside the cluster: {size} "
                         f"{task['type']} task(s), so 0..{size - 1}")
    return Cluster(tuple(chief + workers), task["type"], index, bool(chief))


# A separate process: TensorFlow holds the GIL (and ignores SIGTERM) while it waits for
# the cluster, so no thread or signal handler of this process would ever run.
_WATCHDOG = """
import os, sys, time
pid, seconds, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    time.sleep(0.2)
    if os.getppid() != pid:  # the worker is gone: nothing to stop
        sys.exit(0)
sys.stderr.write(line + "\\n")
sys.stderr.flush()
os.kill(pid, 9)
"""


def connect(timeout: float = DEFAULT_TIMEOUT) -> tf.distribute.MultiWorkerMirroredStrategy:
    """`MultiWorkerMirroredStrategy()` for the cluster in `TF_CONFIG`, within `timeout` seconds.

    TensorFlow waits for every worker to register, holding the GIL and ignoring
    SIGTERM, so a watchdog process prints one line and ends this one (SIGKILL)
    when the cluster is not complete after `timeout` seconds.

    Raises:
        ValueError: a bad `TF_CONFIG`, or this task's port cannot be listened on.
    """
    cluster = read_tf_config()
    if cluster is None:
        return tf.distribute.MultiWorkerMirroredStrategy()  # one worker: this host alone
    line = (f"{os.path.basename(sys.argv[0])}: error: {cluster.name} could not reach the other "
            f"workers of the {cluster.num_workers}-worker cluster ({', '.join(cluster.addresses)}) "
            f"within {timeout:g} s")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout),
                                 line], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.UnknownError as e:
        if "gRPC server" not in str(e):
            raise
        raise ValueError(f"{cluster.name} cannot listen on {cluster.address}: the port is in use "
                         "(or the host is not this machine)") from None
    finally:
        watchdog.kill()
        watchdog.wait()


@dataclasses.dataclass(frozen=True)
class WriteDirs:
    """Where one task writes, and where it restores a backup from.

    Attributes:
        model_dir: The run's directory on the chief; a temporary one elsewhere.
        backup_dir: Where this task's `BackupAndRestore` saves.
        restore_dir: Where it restores from: the chief's backup on every task, so
            that every worker of a restarted cluster resumes from the same epoch.
        temporary: `model_dir` is temporary (delete it when done).
    """

    model_dir: str
    backup_dir: str
    restore_dir: str
    temporary: bool


def write_dirs(model_dir: str, backup_name: str, cluster: Optional[Cluster]) -> WriteDirs:
    """The directories a task writes to (TensorFlow's multi-worker guide).

    The chief (or a single process) writes to `model_dir`; another worker writes
    its final model, logs, summary and backup to a temporary directory (delete it
    after) and restores from the chief's backup.
    """
    backup = os.path.join(model_dir, backup_name)
    if cluster is None or cluster.is_chief:
        return WriteDirs(model_dir, backup, backup, False)
    scratch = tempfile.mkdtemp(prefix=f"tfmp-{cluster.task_type}{cluster.task_index}-")
    return WriteDirs(scratch, os.path.join(scratch, backup_name), backup, True)


class ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` for a non-chief worker: saves to its own (temporary)
    directory, restores from the chief's backup.

    Each worker saving and restoring its own backup can leave workers at
    different epochs after a crash (the chief's file written, another worker's
    not yet); restoring everyone from the chief's keeps them in step.
    """

    def __init__(self, backup_dir: str, restore_dir: str, **kwargs) -> None:
        super().__init__(backup_dir, **kwargs)
        self._restore = keras.callbacks.BackupAndRestore(restore_dir, **kwargs)

    def set_model(self, model) -> None:
        super().set_model(model)
        self._restore.set_model(model)

    def on_train_begin(self, logs=None) -> None:
        self._restore.on_train_begin(logs)
