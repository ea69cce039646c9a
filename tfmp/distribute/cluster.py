"""A multi-worker cluster from `TF_CONFIG`: checked, connected with a timeout, and who writes what.

TensorFlow reads the cluster from the `TF_CONFIG` environment variable (a JSON
object: `{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}`, optionally with one `"chief"` entry). `read_tf_config` checks it
and says in one line what is wrong; `connect` builds the
`MultiWorkerMirroredStrategy` and gives up after a timeout instead of waiting
forever for a worker that never comes; `write_dirs` follows TensorFlow's
multi-worker guide: the chief writes to the real directory, the other workers
to temporary ones, and every worker restores from the chief's backup
(`tfmp.callbacks.SafeBackupAndRestore(..., restore_dir=)`), so a restarted
cluster resumes in step.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Iterator, Optional

import tensorflow as tf

ENV = "TF_CONFIG"
DEFAULT_TIMEOUT = 120.0  # seconds to wait for every worker of the cluster


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker cluster, as TensorFlow reads `TF_CONFIG`.

    Attributes:
        addresses: `host:port` of every task, the chief (if any) first.
        task_type: `"worker"` or `"chief"`.
        task_index: Index within its type.
        address: This task's `host:port`.
    """

    addresses: tuple[str, ...]
    task_type: str
    task_index: int
    address: str

    @property
    def num_workers(self) -> int:
        """Tasks that train: the workers and the chief."""
        return len(self.addresses)

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_index}"


def _section(raw: str, key: str) -> object:
    config = json.loads(raw)
    return config.get(key) if isinstance(config, dict) else None


def read_tf_config() -> Optional[Cluster]:
    """The cluster `TF_CONFIG` describes, read by TensorFlow's `TFConfigClusterResolver`,
    or None when the variable is unset or empty.

    Returns:
        The `Cluster`, or None.

    Raises:
        ValueError: malformed JSON, no `worker` list, a task type or index that is
            not in the cluster (one line naming the value).
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        jobs = resolver.cluster_spec().as_dict()
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not valid JSON ({e.msg} at character {e.pos}): {raw[:80]!r}")
    except (TypeError, ValueError, AttributeError):  # "cluster" is not a dict of lists
        jobs = None
    workers, chief = (jobs or {}).get("worker"), (jobs or {}).get("chief", [])
    if (not isinstance(workers, list) or not isinstance(chief, list) or len(chief) > 1
            or not all(isinstance(a, str) and ":" in a for a in workers + chief)):
        raise ValueError(f"{ENV} needs \"cluster\": {{\"worker\": [\"host:port\", ...]}} (and at "
                         f"most one \"chief\"); got {json.dumps(_section(raw, 'cluster'))}")
    task_type, index = resolver.task_type, resolver.task_id
    if task_type not in ("worker", "chief"):
        raise ValueError(f"{ENV} needs \"task\": {{\"type\": \"worker\", \"index\": i}}; got "
                         f"{json.dumps(_section(raw, 'task'))}")
    size = len(workers if task_type == "worker" else chief)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ValueError(f"{ENV} task index {index!r} is outside the cluster: {size} "
                         f"{task_type} task(s), so 0..{size - 1}")
    address = resolver.cluster_spec().task_address(task_type, index)
    return Cluster(tuple(chief + workers), task_type, index, address)


# A separate process: TensorFlow holds the GIL (and ignores SIGTERM) while it waits for
# the cluster, so no thread or Python signal handler of this process would ever run.
_WATCHDOG = """
import os, signal, sys, time
pid, seconds, signum, line = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the worker, not a traceback here
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    time.sleep(0.2)
    if os.getppid() != pid:  # the worker is gone: nothing to stop
        sys.exit(0)
sys.stderr.write(line + "\\n")
sys.stderr.flush()
os.kill(pid, signum)
"""
EXIT_CODE = 2  # bad input, as every other refusal of the binaries


@contextlib.contextmanager
def _exit_on_sigint() -> Iterator[int]:
    """While it is entered, SIGINT ends this process at once with status 2, without the
    interpreter (which TensorFlow holds): the C library's `_exit` is SIGINT's C-level
    handler, and it exits with its argument, SIGINT's number, 2. The previous handler
    comes back on leaving.

    Yields:
        The signal the watchdog is to send: SIGINT, or SIGKILL (status -9) where the C
        library's `signal` cannot be reached (not the main thread, no C library) or SIGINT
        is ignored (a worker started in the background by a script keeps it so).
    """
    libc = None
    if signal.SIGINT == EXIT_CODE and threading.current_thread() is threading.main_thread():
        try:
            libc = ctypes.CDLL(None)
            libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, (ctypes.c_int,
                                                                          ctypes.c_void_p)
            exit_now = ctypes.cast(libc._exit, ctypes.c_void_p)
        except (OSError, AttributeError, TypeError):  # no C library to reach (not POSIX)
            libc = None
    previous = signal.getsignal(signal.SIGINT)  # None: not installed from Python
    if libc is None or previous is signal.SIG_IGN:  # a worker started with `&` ignores SIGINT
        yield getattr(signal, "SIGKILL", 9)
        return
    old = libc.signal(signal.SIGINT, exit_now)
    try:
        yield signal.SIGINT
    finally:
        if previous is None:
            libc.signal(signal.SIGINT, old)
        else:  # Python's own C handler again, as Python installs it
            signal.signal(signal.SIGINT, previous)


def connect(timeout: float = DEFAULT_TIMEOUT) -> tf.distribute.MultiWorkerMirroredStrategy:
    """`MultiWorkerMirroredStrategy()` for the cluster in `TF_CONFIG`, within `timeout` seconds.

    TensorFlow waits for every worker to register, holding the GIL and ignoring
    SIGTERM, so a watchdog process prints one line when the cluster is not
    complete after `timeout` seconds, and ends this process with exit status 2
    (bad input, as the binaries' other refusals): meanwhile SIGINT's handler is the
    C library's `_exit`, which needs no interpreter. A Ctrl-C while it waits ends
    it the same way, at once. (Off the main thread, or without a C library, the
    watchdog kills it instead: status -9.)

    Args:
        timeout: Seconds to wait for every worker.

    Returns:
        The strategy (this host alone when `TF_CONFIG` is unset).

    Raises:
        ValueError: a bad `TF_CONFIG`, or this task's port cannot be listened on.
    """
    cluster = read_tf_config()
    if cluster is None:
        return tf.distribute.MultiWorkerMirroredStrategy()  # one worker: this host alone
    line = (f"{os.path.basename(sys.argv[0])}: error: {cluster.name} could not reach the other "
            f"workers of the {cluster.num_workers}-worker cluster ({', '.join(cluster.addresses)}) "
            f"within {timeout:g} s")
    sys.stdout.flush()  # `_exit` writes out no buffer
    sys.stderr.flush()
    with _exit_on_sigint() as signum:
        watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), str(int(signum)),
             line], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except tf.errors.UnknownError as e:
            if "gRPC server" not in str(e):
                raise
            raise ValueError(f"{cluster.name} cannot listen on {cluster.address}: the port is in "
                             "use (or the host is not this machine)") from None
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


def write_dirs(model_dir: str, backup_name: str,
               strategy: Optional[tf.distribute.Strategy] = None) -> WriteDirs:
    """The directories a task writes to (TensorFlow's multi-worker guide).

    The chief, as TensorFlow's strategy decides it (`strategy.extended.should_checkpoint`),
    and a single process write to `model_dir`; another worker writes its final
    model, logs, summary and backup to a temporary directory (delete it after) and
    restores from the chief's backup.

    Args:
        model_dir: The run's directory.
        backup_name: The backup's subdirectory.
        strategy: The strategy training runs under (default: the current one).

    Returns:
        A `WriteDirs`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    backup = os.path.join(model_dir, backup_name)
    if strategy.extended.should_checkpoint:
        return WriteDirs(model_dir, backup, backup, False)
    resolver = strategy.cluster_resolver
    scratch = tempfile.mkdtemp(prefix=f"tfmp-{resolver.task_type}{resolver.task_id}-")
    return WriteDirs(scratch, os.path.join(scratch, backup_name), backup, True)
