"""The fork server behind `helpers.Zygote`: imports TensorFlow, Keras and tfmp once, then forks
one child per request, each running what `python <argv>` would run.

    python tests/zygote_server.py

Writes `ready` on stdout once imported, then reads requests on stdin, one JSON line each:
`{"argv": [...], "env": {...}, "cwd": ..., "stdout": path, "stderr": path}`, where argv is
`["-m", MODULE, ARGS...]`, `["-c", CODE, ARGS...]` or `[SCRIPT, ARGS...]`. For each it forks
a child (its own cwd, environment, stdio, sys.argv and sys.path, as a fresh interpreter would
have them) and replies `{"pid": pid}`; when a child ends, `{"pid": pid, "code": exit_code}`
(negative: the signal that ended it).
"""

import atexit
import importlib
import json
import os
import runpy
import select
import sys
import threading
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # tfmp from the checkout, as `python -c` started in it would have it

for _module in ("absl.app", "keras", "tensorflow", "tfmp", "tfmp.app"):  # once, before any fork
    importlib.import_module(_module)


def reply(message):
    os.write(1, json.dumps(message).encode() + b"\n")


def _redirect_stdio(request):
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                           (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, mode, 0o644)
        os.dup2(new, fd)
        os.close(new)
    sys.stdin = open(os.devnull)


def _run(argv, cwd, extra):
    """Runs argv as `python` would, after its options: sys.argv and sys.path[0] set as there
    (the zygote's own sys.path[0], the checkout, replaced), PYTHONPATH's entries next."""
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0:1] = [cwd, *extra]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":  # -c CODE ARGS...
        sys.argv = ["-c", *argv[2:]]
        sys.path[0:1] = ["", *extra]
        main = sys.modules["__main__"] = types.ModuleType("__main__")  # not this server
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:  # SCRIPT ARGS...
        sys.argv = list(argv)
        sys.path[0:1] = [os.path.dirname(os.path.abspath(argv[0])), *extra]
        runpy.run_path(argv[0], run_name="__main__")


def child(request):
    """What `python <argv>` would run, with its own stdio and cwd; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile
        tempfile.tempdir = None  # from TMPDIR as a fresh interpreter would, not the zygote's
        import random
        import numpy as np
        random.seed()  # a fresh interpreter's seeds, not the ones every child would share
        np.random.seed()
        _redirect_stdio(request)
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        try:
            _run(request["argv"], request["cwd"], extra)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        threading._shutdown()  # non-daemon threads joined, as at an interpreter's exit
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    """Requests on stdin (one JSON line each); while children run, polled every 20 ms."""
    os.write(1, b"ready\n")
    pending, running = b"", set()
    while True:
        if select.select([0], [], [], 0.02 if running else None)[0]:
            data = os.read(0, 1 << 16)
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    child(json.loads(line))
                running.add(pid)
                reply({"pid": pid})
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                reply({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
