"""Small models, data and optimizer steps shared by the tests, and the zygote binaries fork from."""

import dataclasses
import json
import functools
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import tensorflow as tf

if __name__ != "helpers":  # `tests.helpers` would be a second module: a second zygote per worker
    raise ImportError(f"import this module as `helpers` (setup.cfg puts tests/ on the path), "
                      f"not as {__name__!r}")

INF = float("inf")


def _vars():
    return [keras.Variable(np.ones((2,), "float32"), name="a"),
            keras.Variable(np.ones((3,), "float32"), name="b")]


def _step(opt, variables, bad=None):
    """One apply; `bad` is the index of the variable whose gradient is inf."""
    grads = [tf.ones(v.shape) for v in variables]
    if bad is not None:
        grads[bad] = tf.constant([1.0] + [INF] * (variables[bad].shape[0] - 1))
    opt.apply(grads, variables)


def _state(opt):
    return (opt.loss_scale, int(opt.skipped_steps.numpy()), int(opt.step_counter.numpy()))


def make_model(seed=1, out_dtype="float32"):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1, dtype=out_dtype),
    ])


class Subclassed(keras.Model):
    """A subclassed model (Keras cannot clone it): `layers` applied in turn (`chain`), by
    default one Dense layer."""

    def __init__(self, *layers):
        super().__init__()
        self.chain = list(layers) or [keras.layers.Dense(2)]

    def call(self, x):
        for layer in self.chain:
            x = layer(x)
        return x


class HalfRMSNorm(keras.layers.Layer):
    """A normalization (by its name) whose statistics run in the compute dtype."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * keras.ops.rsqrt(keras.ops.mean(keras.ops.square(x), axis=-1, keepdims=True)
                                   + 1e-6) * self.scale


class CountCalls(keras.layers.Layer):
    """The identity, counting how often Keras runs its Python code in training: once per
    trace of a train step (or of `tfmp.rewrite.run_model`, which traces in training mode)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.training_calls = 0

    def call(self, x, training=False):
        self.training_calls += bool(training)
        return x


def make_data(n=256, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 8).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def mirrored():
    """One MirroredStrategy over the two logical CPUs, shared by every test that trains.

    Several instances in one process hand out the same collective instance keys
    (TF 2.21), and an all-reduce of one model can then meet another model's of
    another shape ("Shape mismatch in the collective instance"). Tests that train
    under MirroredStrategy use this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def truncate(path):
    """Cuts a file (a `pathlib.Path`) to its first half, as a write killed midway leaves it."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])


def backup_epoch(backup):
    """The epoch a `BackupAndRestore` folder's metadata records (0 while there is none)."""
    try:
        with open(os.path.join(backup, "training_metadata.json")) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):
        return 0


def kill_after_backup(argv, backup, env, epoch=2, into_next=0.0):
    """Starts `python <argv>` (forked from the zygote) and SIGKILLs it once `backup` records
    `epoch` (`into_next`: that share of an epoch's time later, to kill it mid-epoch).

    Returns:
        The killed child's result (its return code is -SIGKILL, checked).
    """
    import signal
    import time

    proc = zygote().start(argv, env=env)
    try:
        seen, deadline = {}, time.time() + 240
        while backup_epoch(backup) < epoch and time.time() < deadline and proc.poll() is None:
            seen.setdefault(backup_epoch(backup), time.time())
            time.sleep(0.005)
        assert backup_epoch(backup) == epoch, f"the run never completed {epoch} epochs"
        if into_next:
            time.sleep(into_next * (time.time() - seen.get(epoch - 1, time.time() - 1.0)))
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        killed = proc.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return killed


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(tool, *args, timeout=300, **extra_env):
    """`python -m tools.<tool> args...` from the checkout, TF's C++ logging quiet, in a
    process of its own forked from this worker's `Zygote` (TensorFlow already imported)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra_env)
    return zygote().run(["-m", f"tools.{tool}", *args], env=env, timeout=timeout)


CASE_DRIVER = os.path.join(ROOT, "tests", "case_driver.py")  # run_tool_cases' child
ZYGOTE_SERVER = os.path.join(ROOT, "tests", "zygote_server.py")  # the Zygote's process


def run_tool_cases(tool, cases, timeout=300, stdout=False, **extra_env):
    """Runs `tools.<tool>` once per argument list, all in one child process.

    A case is an argument list, or `{"argv": [...], "env": {...}, "mock_data": n,
    "file_size_limit": bytes}` (variables set for that case; tensorflow-datasets' mock data
    with n examples around it; no file written past that size, as on a full disk).

    Each case goes through the binary's own entry point (`cli.run(main)`, absl
    flag parsing included) from default flag values; TensorFlow is imported
    once instead of once per case. For cases that end before anything is
    built (bad input), or for several runs of a binary in a row (tests/case_driver.py). Returns
    `[(exit_code, stderr), ...]`, or `[(exit_code, stderr, stdout), ...]` with `stdout=True`.
    """
    import json

    env = {k: v for k, v in os.environ.items() if k != "TFMP_PRECISION"}  # cases set their own
    env.update(TF_CPP_MIN_LOG_LEVEL="3", **extra_env)
    proc = zygote().run([CASE_DRIVER, tool, json.dumps(cases)], env=env, timeout=timeout)
    line = [l for l in proc.stdout.splitlines() if l.startswith("CASES=")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return [tuple(r) if stdout else tuple(r[:2]) for r in json.loads(line[0][len("CASES="):])]


class Zygote:
    """A process with TensorFlow, Keras and tfmp imported that forks one child per binary run.

    Importing TensorFlow takes 5-9 s of a core here, most of a binary's start: each pytest
    worker pays it once, and every `run_tool` / `run_tool_cases` run is a real process of
    its own (own pid, environment, working directory, stdio and exit status, `absl.app.run`
    included) started in a fraction of a second. Children may run side by side (`start`):
    the workers of a cluster. Nothing runs in the zygote but imports: TensorFlow's runtime
    starts in each child (so `--num_cpu_devices` and cluster set-ups still come first
    there). A child can be killed like any process (`Child.pid`). Runs that are about the
    interpreter itself (a fresh import) or the launcher (`launch` starts its workers as
    fresh processes) use `subprocess` directly. The zygote's program: tests/zygote_server.py.
    """

    def __init__(self):
        import queue
        import select

        self.proc = subprocess.Popen(
            [sys.executable, ZYGOTE_SERVER], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, bufsize=0, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        started = select.select([self.proc.stdout], [], [], 120)[0]
        assert started and self.proc.stdout.readline() == b"ready\n", "the zygote did not start"
        self._send = threading.Lock()  # one request at a time: its pid is the next pid reply
        self._pids: queue.Queue = queue.Queue()
        self._codes: dict[int, int] = {}
        self._done = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        """Sorts the zygote's replies: a started child's pid, or a child's exit code."""
        import json

        for line in iter(self.proc.stdout.readline, b""):
            reply = json.loads(line)
            with self._done:
                if "code" not in reply:  # a new child: a code left for an earlier one of its pid
                    self._codes.pop(reply["pid"], None)  # (never waited for) is not its own
                    self._pids.put(reply["pid"])
                    continue
                self._codes[reply["pid"]] = reply["code"]
                self._done.notify_all()

    def start(self, argv, env, cwd=ROOT) -> "Child":
        """`python *argv` as a child, not waited for (`Child.wait`). argv: `-m MODULE ARGS`,
        `-c CODE ARGS` or `SCRIPT ARGS`."""
        import json
        import tempfile

        tmp = tempfile.mkdtemp()
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        request = dict(argv=list(argv), env=env, cwd=str(cwd), stdout=out, stderr=err)
        with self._send:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            pid = self._pids.get(timeout=30)
        return Child(self, pid, list(argv), tmp)

    def run(self, argv, env, timeout=300, cwd=ROOT):
        """`python *argv` as a child; a `subprocess.CompletedProcess` (text stdout/stderr)."""
        return self.start(argv, env, cwd).wait(timeout)

    def exit_code(self, pid, timeout):
        """The child's exit code once it ends (None while it runs after `timeout` seconds)."""
        with self._done:
            self._done.wait_for(lambda: pid in self._codes, timeout)
            return self._codes.get(pid)

    def forget(self, pid):
        """Drops a waited-for child's exit code."""
        with self._done:
            self._codes.pop(pid, None)


@dataclasses.dataclass(frozen=True)
class Child:
    """A process a `Zygote` forked: its pid, and its output once it ends."""

    zygote: Zygote
    pid: int
    argv: list
    tmp: str  # its stdout and stderr files

    def poll(self):
        """Its exit code (negative: the signal that ended it), or None while it runs."""
        return self.zygote.exit_code(self.pid, 0)

    def wait(self, timeout=300):
        """A `subprocess.CompletedProcess` (text stdout/stderr); killed after `timeout` s."""
        import shutil
        import signal

        try:
            code = self.zygote.exit_code(self.pid, timeout)
            if code is None:
                os.kill(self.pid, signal.SIGKILL)
                self.zygote.exit_code(self.pid, 30)
                raise subprocess.TimeoutExpired([sys.executable, *self.argv], timeout)
            with open(os.path.join(self.tmp, "out")) as o, open(os.path.join(self.tmp, "err")) as e:
                return subprocess.CompletedProcess([sys.executable, *self.argv], code,
                                                   o.read(), e.read())
        finally:
            self.zygote.forget(self.pid)
            shutil.rmtree(self.tmp, ignore_errors=True)


_zygote = None


def zygote():
    """This process's `Zygote`, started on first use (again if it died)."""
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote()
    return _zygote
