"""The output folder of tools/compare and tools/export: a result is never silently replaced.

A folder that holds a previous result (a file of the tool's own names) is refused before
any work, in one line naming `--overwrite`. A run writes its files into a hidden temporary
folder inside the output folder; only when it has written them all (a failing accuracy
gate or verdict included) are they moved in, the report last. With `--overwrite` the
previous result's files go first, all of them together, into `previous.<date>-<time>/`
beside them (nothing deleted; a warning names them): the files beside a report are the
ones it lists. A run that fails leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Collection, Iterator, Optional

from absl import logging

from tfmp.app import cli, run_dir
from tfmp.atomic import missing_folders

OVERWRITE_HELP = ("Replace a previous result in --output_dir: its files are moved into "
                  "<output_dir>/previous.<date>-<time>/ (nothing is deleted). Without it, an "
                  "output folder holding one is refused.")
PREVIOUS = "previous"
STAGING_PREFIX = ".new-result-"


def previous_result(directory: str, names: Collection[str]) -> list[str]:
    """The files of a previous result in `directory`.

    Args:
        directory: The output folder.
        names: The file names the tool writes.

    Returns:
        Those of `names` that are files in `directory`, in the order of `names`.
    """
    return [name for name in names if os.path.isfile(os.path.join(directory, name))]


def check_output_dir(directory: str, names: Collection[str], overwrite: bool) -> None:
    """Refuses, before any work, an `--output_dir` that cannot be written or created, or that
    holds a previous result unless `overwrite`. A missing one is created by `new_result`.

    Args:
        directory: The `--output_dir`.
        names: The file names the tool writes.
        overwrite: `--overwrite`.

    Raises:
        ToolError: one line naming the folder (and `--overwrite` for a previous result).
    """
    flag = f"--output_dir={directory!r}"
    path, existing = os.path.abspath(directory), missing_folders(directory)[-1]
    if existing == path and not os.path.isdir(path):
        cli.fail(f"{flag} exists and is not a directory")
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        cli.fail(f"{flag} is not writable" if existing == path else
                 f"{flag} cannot be created: {existing!r} is not a writable directory")
    found = previous_result(directory, names) if existing == path else []
    if found and not overwrite:
        cli.fail(f"{flag} holds a previous result ({', '.join(found)}): give --overwrite to move "
                 f"it into {os.path.join(directory, PREVIOUS)}.<date>-<time>/ (nothing is "
                 "deleted), or another --output_dir")


def move_previous(directory: str, names: Collection[str]) -> Optional[str]:
    """Moves the files of a previous result into a new `previous.<date>-<time>` folder in
    `directory`, with a warning naming them.

    Args:
        directory: The output folder.
        names: The file names the tool writes.

    Returns:
        The folder they were moved to, or None when there were none.
    """
    found = previous_result(directory, names)
    if not found:
        return None
    target = run_dir.dated(os.path.join(directory, PREVIOUS))
    os.mkdir(target)
    for name in found:
        os.rename(os.path.join(directory, name), os.path.join(target, name))
    logging.warning("moved the previous result in %s (%s) to %s", directory, ", ".join(found),
                    target)
    return target


@contextlib.contextmanager
def new_result(directory: str, names: Collection[str], report: str) -> Iterator[str]:
    """A temporary folder in `directory` to write a result into, moved in when complete.

    When the block ends without an exception the previous result is moved aside
    (`move_previous`) and every file written is moved into `directory`, `report` last.
    When it raises, the temporary folder is removed with what it holds, and the folders
    made for it: `directory` is left as it was (or not there).

    Args:
        directory: The output folder (checked by `check_output_dir`); created, with its
            parents, if missing.
        names: The file names the tool writes.
        report: The file that describes the others (moved in last).

    Yields:
        The temporary folder.

    Raises:
        ToolError: the folder cannot be created (one line).
    """
    made = missing_folders(directory)[:-1]  # the folders made here, deepest first
    try:
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
    except OSError as e:
        cli.fail(f"--output_dir={directory!r} cannot be written: {e.strerror or e}")
    done = False
    try:
        yield staging
        written = sorted(os.listdir(staging), key=lambda name: name == report)
        move_previous(directory, names)
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made if not done else ():
            with contextlib.suppress(OSError):  # not empty: something else wrote there
                os.rmdir(folder)
