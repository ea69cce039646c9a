"""Multi-worker training on one machine: N worker processes on 127.0.0.1, each with its `TF_CONFIG`.

`launch` starts the workers (free ports found by the OS unless a base port is
given), prefixes every line they print with `[worker i]`, stops the others as
soon as one fails (SIGTERM, then SIGKILL: TensorFlow ignores SIGTERM while it
waits for its peers) and returns the chief's exit code, or a non-zero code when
any worker failed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence, TextIO

HOST = "127.0.0.1"
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


def free_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct ports the OS reports free on `host` (held open together while chosen).

    Args:
        count: How many.
        host: The interface.

    Returns:
        The port numbers.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], index: int, host: str = HOST) -> str:
    """The `TF_CONFIG` of worker `index` in a cluster of `host:port` workers (worker 0 is chief).

    Args:
        ports: One port per worker.
        index: This worker's index.
        host: The workers' host.

    Returns:
        The JSON string.
    """
    return json.dumps({"cluster": {"worker": [f"{host}:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def describe_exit(code: int) -> str:
    """`exit code 2`, or `signal SIGKILL` for a process a signal ended.

    Args:
        code: A `Popen.returncode` (negative: the signal's number).

    Returns:
        The description.
    """
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _pump(index: int, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            out.write(f"[worker {index}] {line}")
            out.flush()


def _stop(processes: Sequence[subprocess.Popen], grace: float) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: Sequence[str], num_workers: int, *, port: Optional[int] = None,
           out: TextIO = sys.stdout, env: Optional[dict[str, str]] = None,
           poll_seconds: float = 0.1, stop_grace: float = STOP_GRACE) -> int:
    """Runs `command` as `num_workers` workers of one cluster on 127.0.0.1.

    Args:
        command: The worker's command line (`[sys.executable, "-m", "tools.train", ...]`).
        num_workers: Workers to start (at least 1).
        port: First port of a consecutive range; default: free ports from the OS.
        out: Where the workers' prefixed output goes (stdout and stderr merged).
        env: Environment of the workers (default: this process's), `TF_CONFIG` added.
        poll_seconds: How often the workers' exit codes are checked.
        stop_grace: Seconds between SIGTERM and SIGKILL when stopping the others.

    Returns:
        The chief's (worker 0's) exit code when every worker succeeded; otherwise the
        first failing worker's code (1 if a signal ended it). The failure is
        reported on `out` as `launch_local: worker i ... ; stopping the others`.

    Raises:
        ValueError: `num_workers` < 1 or a port outside 1..65535.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r} must be a positive integer")
    ports = free_ports(num_workers) if port is None else list(range(port, port + num_workers))
    if not all(0 < p < 65536 for p in ports):
        raise ValueError(f"port={port!r}: ports {ports[0]}..{ports[-1]} are not all in 1..65535")
    lock = threading.Lock()
    base = dict(os.environ if env is None else env)
    processes, pumps = [], []
    for i in range(num_workers):
        p = subprocess.Popen(list(command), env={**base, "TF_CONFIG": tf_config(ports, i)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)
        processes.append(p)
        pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True))
        pumps[-1].start()
    failed: Optional[tuple[int, int]] = None
    try:
        while True:
            codes = [p.poll() for p in processes]  # every process, every time
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or None not in codes:
                break
            time.sleep(poll_seconds)
        if failed is not None:
            with lock:
                out.write(f"launch_local: worker {failed[0]} failed ({describe_exit(failed[1])}); "
                          "stopping the others\n")
                out.flush()
    finally:
        _stop(processes, stop_grace)
        for t in pumps:
            t.join(5)
    if failed is not None:
        return failed[1] if failed[1] > 0 else 1
    return processes[0].returncode
