"""Runs a binary of tools/ once per case in this one process: `run_tool_cases`' child.

    python tests/case_driver.py TOOL CASES_JSON

CASES_JSON is a list of cases, each an argument list or `{"argv": [...], "env": {...},
"mock_data": n, "file_size_limit": bytes}` (see `helpers.run_tool_cases`). Each case goes
through the binary's own entry point (`cli.run(main)`, absl flag parsing included) from the
default flag values. The last line on stdout is `CASES=` and a JSON list of `[exit_code,
stderr, stdout]`, one per case.
"""

import contextlib
import importlib
import io
import json
import os
import resource
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's tools/ and tfmp, from wherever this is started

from absl import flags, logging as absl_logging  # noqa: E402


def _run_case(tool, name, case, verbosity):
    """One case through `cli.run(tool.main)`: `[exit_code, stderr, stdout]`."""
    from tfmp.app import cli

    argv, env = case["argv"], case.get("env", {})
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    flags.FLAGS.unparse_flags()  # every case starts from the defaults
    if verbosity is not None:
        absl_logging.set_verbosity(verbosity)
    sys.argv = [name + ".py", *argv]
    err, out = io.StringIO(), io.StringIO()
    mock = contextlib.nullcontext()
    if "mock_data" in case:  # tensorflow-datasets' mock data for every dataset
        import tensorflow_datasets as tfds
        mock = tfds.testing.mock_data(num_examples=case["mock_data"])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if "file_size_limit" in case:  # a full disk; Python ignores SIGXFSZ: writes fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["file_size_limit"], limit[1]))
    # Each case sees its warnings as a process of its own would: not hidden because an
    # earlier case already showed them (the "default" action shows one once per place, and
    # tfmp says a policy's trap once per process).
    from tfmp.precision import policy

    warnings.onceregistry.clear()
    policy._warn_once.cache_clear()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), mock, \
                warnings.catch_warnings():  # new filters: every module's registry starts empty
            absl_logging.get_absl_handler().python_handler.stream = err  # bound once, at import
            try:
                cli.run(tool.main)
                code = 0
            except SystemExit as e:  # as the interpreter maps sys.exit's argument
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=err)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    finally:
        for key, value in before.items():  # the environment as it was before the case
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [code, err.getvalue(), out.getvalue()]


def main(name, cases):
    tool = importlib.import_module("tools." + name)  # its flags are defined once
    sys.modules["__main__"].__doc__ = tool.__doc__  # --help's text, as in `python -m tools.<name>`
    results = []
    # absl.app.run sets logging up (its handler, INFO) in a process's first run only; unparsing
    # the flags then puts --verbosity back to -1 (WARNING): each later case gets the first's.
    verbosity = None
    for case in cases:
        case = {"argv": case} if isinstance(case, list) else case
        results.append(_run_case(tool, name, case, verbosity))
        verbosity = absl_logging.get_verbosity() if verbosity is None else verbosity
    sys.argv = sys.argv[:1]
    sys.stdout.write("CASES=" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
