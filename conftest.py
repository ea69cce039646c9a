"""Runs the examples of README.md and docs/*.md as tests, with Sybil.

Each document runs in order, in a temporary directory of its own (its working directory), in
one pytest worker (TensorFlow is already imported there):

- a ```python block runs as written; a block whose first line is `# file: NAME` is written to
  NAME in that directory instead (a program a later command runs);
- a ```console block runs its `$ ` commands (a line ending in `\\` goes on) in that
  directory, with this checkout on PYTHONPATH: `python ...` in a process forked from the
  worker's zygote (tests/helpers.py), anything else (or with pipes, redirections, variables)
  through the shell. A command must exit 0, or with the code its trailing comment names
  (`$ python -m tools.train --data=x.npz  # exits 2`), in which case it must say one error
  line and no traceback. Output shown under a command is not compared;
- ```bash blocks are shown, not run (set-up commands, commands for hardware or clusters this
  machine does not have, and runs too long for the suite, each saying which test runs it); their
  `python -m tools.<name>` commands are checked against that binary's flags, so a renamed or
  removed flag fails here too;
- `<!-- skip: next -->` before a block skips it (Sybil's own skip directive); say why beside it.

The global Keras state a document leaves (dtype policy, session) is reset after it.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = os.path.dirname(os.path.abspath(__file__))
_FILE = re.compile(r"\A# file: (\S+)\n")
_EXIT = re.compile(r"\s+#\s*exits (\d+)\s*\Z")


class _PythonOrFile(PythonCodeBlockParser):
    """Python blocks, except that one starting `# file: NAME` is written to NAME."""

    def __call__(self, document):
        for region in super().__call__(document):
            source = str(region.parsed)
            match = _FILE.match(source)
            if match:
                region.evaluator = _writer(match.group(1), source)
            yield region


def _writer(name, source):
    def write(example):
        with open(os.path.join(example.namespace["__docdir__"], name), "w") as f:
            f.write(source)
    return write


def _commands(source, prompt="$ "):
    """The commands of a block (lines starting with `prompt`), continuation lines joined."""
    commands, current = [], None
    for line in source.splitlines():
        if current is not None:
            current += " " + line.strip()
        elif line.startswith(prompt) and line.strip() and not line.lstrip().startswith("#"):
            current = line[len(prompt):].strip()
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = None
    return commands


def _run_console(example):
    cwd = example.namespace["__docdir__"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("TFMP_PRECISION", None)
    for command in _commands(str(example.parsed)):
        expected = 0
        match = _EXIT.search(command)
        if match:
            expected, command = int(match.group(1)), command[:match.start()]
        argv = shlex.split(command, comments=True)
        if argv[0] == "python" and not re.search(r"[|&;<>$`~*]", command):
            from helpers import zygote  # tests/helpers.py: TensorFlow imported once per worker

            proc = zygote().run(argv[1:], env=env, cwd=cwd, timeout=300)
        else:
            proc = subprocess.run(command, shell=True, cwd=cwd, env=env, text=True,
                                  capture_output=True, timeout=300)
        detail = f"$ {command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == expected, detail
        if expected:  # one error line (log lines may precede it), no traceback
            errors = [l for l in proc.stderr.splitlines() if "error:" in l]
            assert len(errors) == 1 and "Traceback" not in proc.stderr, detail


_TOOL_FLAGS = {}


def _tool_flags(module):
    """The flags `python -m <module>` defines (absl's own included)."""
    if module not in _TOOL_FLAGS:
        from helpers import zygote

        code = ("import importlib, sys; from absl import flags; importlib.import_module(sys.argv[1]);"
                " print(' '.join(n + '?' * f.boolean for n, f in flags.FLAGS._flags().items()))")
        proc = zygote().run(["-c", code, module], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        _TOOL_FLAGS[module] = {n.rstrip("?"): n.endswith("?") for n in proc.stdout.split()}
    return _TOOL_FLAGS[module]


def _check_flags(example):
    """A block shown, not run: its `python -m tools.<name>` commands use that binary's flags."""
    for command in _commands(str(example.parsed).replace("\n$ ", "\n"), prompt=""):
        try:
            argv = shlex.split(command.removeprefix("$ "), comments=True)
        except ValueError:  # a quote in a comment
            argv = command.removeprefix("$ ").split("#")[0].split()
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv.pop(0)  # VARIABLE=value before the command
        if argv[:2] != ["python", "-m"] or not argv[2].startswith("tools."):
            continue
        module, args, rest = argv[2], argv[3:], []
        if "--" in args:  # tools.launch_local: the flags after `--` are its workers' (`--module`)
            args, rest = args[:args.index("--")], args[args.index("--") + 1:]
        workers = next((a.split("=", 1)[1] for a in args if a.startswith("--module=")), "tools.train")
        for binary, flags in ((module, args), (workers, rest)):
            names = [a[2:].split("=")[0] for a in flags if a.startswith("--")]
            defined = _tool_flags(binary)  # name: whether it is boolean (--noname)
            unknown = [n for n in names if n not in defined
                       and not defined.get(n.removeprefix("no"), False)]
            assert not unknown, f"{command}: {binary} has no flag {unknown}"


def _setup(namespace):
    namespace["__docdir__"] = tempfile.mkdtemp(prefix="tfmp-docs-")
    namespace["__cwd__"] = os.getcwd()
    namespace["__precision__"] = os.environ.pop("TFMP_PRECISION", None)  # "auto" as documented
    os.chdir(namespace["__docdir__"])


def _teardown(namespace):
    os.chdir(namespace["__cwd__"])
    if namespace["__precision__"] is not None:
        os.environ["TFMP_PRECISION"] = namespace["__precision__"]
    shutil.rmtree(namespace["__docdir__"], ignore_errors=True)
    if "keras" in sys.modules:
        import keras

        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()


pytest_collect_file = Sybil(
    parsers=[_PythonOrFile(), CodeBlockParser("console", _run_console),
             CodeBlockParser("bash", _check_flags), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    setup=_setup,
    teardown=_teardown,
).pytest()
