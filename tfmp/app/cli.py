"""Helpers for tfmp's absl binaries: one clear line and a non-zero exit on bad input."""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from typing import Callable, NoReturn, Sequence

from absl import app, logging

import tfmp  # noqa: F401  (registers tfmp's layers and optimizer for load_model)
from tfmp._messages import TfmpWarning, first_line
from tfmp.app.sources import SourceError, load_file
from tfmp.atomic import save_model_atomically

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2


class ToolError(Exception):
    """Printed as one line; the binary exits with `code` (2: bad input)."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    raise ToolError(message, code)


def describe_os_error(error: OSError) -> str:
    """`<file>: <reason>` in one line, also for h5py's errors (their text spans lines and
    carries the errno and file name inside it).

    Args:
        error: An `OSError` (from Python, h5py or TensorFlow's file layer).

    Returns:
        One line.
    """
    text = " ".join(str(error).split())
    number = error.errno or (int(m.group(1)) if (m := re.search(r"errno = (\d+)", text)) else None)
    reason = os.strerror(number) if number else " ".join(str(error.strerror or text).split())
    name = re.search(r"filename = '([^']+)'", text)
    name = error.filename or (name.group(1) if name else None)
    return f"{name}: {reason}" if name else reason


def _log_tfmp_warnings() -> None:
    """Shows tfmp's own warnings (`TfmpWarning`) as one absl log line each, like the binaries'
    other messages, instead of Python's `file:line: category: message` and source line."""
    show = warnings.showwarning
    if getattr(show, "logs_tfmp_warnings", False):  # a second run in one process
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TfmpWarning):
            logging.warning("%s", message)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning.logs_tfmp_warnings = True
    warnings.showwarning = showwarning


def run(main: Callable[[Sequence[str]], int], positional: bool = False) -> None:
    """`absl.app.run(main)`, turning `ToolError` into one line on stderr and exit 2.

    Positional arguments are refused unless `positional` (the arguments after `--`).
    tfmp's warnings are absl log lines (`TfmpWarning`: said once, in one line).
    """
    _log_tfmp_warnings()

    def wrapped(argv: Sequence[str]) -> int:
        try:
            if len(argv) > 1 and not positional:
                fail(f"unexpected positional arguments {list(argv[1:])}; all options are --flags")
            return main(argv)
        except ToolError as e:
            sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {e}\n")
            return e.code

    app.run(wrapped)


IMPORT_MODULES_HELP = ("Python modules to import before loading --model_path: where the model's "
                       "custom layers and models are registered (keras.saving."
                       "register_keras_serializable), e.g. --import_modules=my_project.layers.")


def import_modules(names: Sequence[str]) -> None:
    """Imports each module (`--import_modules`), or fails with one line naming it.

    Args:
        names: Dotted module names.

    Raises:
        ToolError: a module cannot be imported.
    """
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (a module may raise anything on import)
            first = first_line(e)
            fail(f"--import_modules: cannot import {name!r} ({type(e).__name__}: {first})")


def load_keras_model(path: str, modules: Sequence[str] = ()):
    """Loads a `.keras` file, or fails with one line naming the path and the problem.

    Args:
        path: The file (`--model_path`).
        modules: Modules to import first (`--import_modules`: the model's custom classes).

    Returns:
        The model.

    Raises:
        ToolError: missing, unreadable or not a loadable `.keras` file.
    """
    try:  # the reference models' layers, when run from a checkout
        import models  # noqa: F401
    except ImportError:
        pass

    import_modules(modules)
    try:
        return load_file(path, "model_path")
    except SourceError as e:
        fail(str(e))


def save_keras_model_atomically(model, path: str) -> None:
    """Saves through a temporary file and a rename; one line if the directory is missing.

    Args:
        model: The model.
        path: The `.keras` file (`--output_path`).

    Raises:
        ToolError: the directory does not exist.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        fail(f"--output_path={path!r}: directory {directory!r} does not exist")
    save_model_atomically(model, path)
