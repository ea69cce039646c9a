"""Writes that never leave half a file: a temporary file beside the target, then a rename.

A killed or failing writer leaves the previous version (or nothing) at the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Iterator, Optional

_RANDOM = "[a-z0-9_]{8}"  # the part of a name `tempfile` makes up
_TEMPORARY = re.compile(rf"\.(.+)\.tmp-{_RANDOM}(\..*)?")  # .<target>.tmp-<random><suffix>
# What `atomic_path` wrote before its temporary files were hidden and named after their target.
_UNNAMED_TEMPORARY = re.compile(rf"tmp{_RANDOM}(\..*)?")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str) -> Iterator[str]:
    """Yields a temporary path beside `path`, renamed over it only if the block succeeds.

    A killed or failing writer never leaves a half-written file at `path`.

    Args:
        path: The file to write.
        suffix: The temporary file's suffix (some writers choose the format by it).

    Yields:
        The temporary path to write to.
    """
    directory = os.path.dirname(os.path.abspath(path))
    # Hidden and named after its target: what a killed writer leaves is not taken for a
    # file of the run (`*.weights.h5`, a checkpoint pattern).
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix,
                               dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every output private
        _fsync(tmp)  # the data on disk before the rename makes it the file
        os.replace(tmp, path)
        _fsync(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_target(name: str, unnamed: bool = False) -> Optional[str]:
    """The file an `atomic_path` temporary file named `name` was to become, or None if `name`
    is not one: what a writer killed in the middle of a write leaves beside its target.

    Args:
        name: A file name (no directory).
        unnamed: Also recognize the `tmp<random><suffix>` names earlier versions of
            `atomic_path` used, which do not say their target (`""` is returned for them): only
            where no other writer puts such names.

    Returns:
        The target's name, `""`, or None.
    """
    match = _TEMPORARY.fullmatch(name)
    if match:
        return match.group(1)
    return "" if unnamed and _UNNAMED_TEMPORARY.fullmatch(name) else None


def missing_folders(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would create, deepest first, and below them the
    nearest one that exists: `missing_folders("a/b")` is `[".../a/b", ".../a", "..."]` when
    neither `a/b` nor `a` exists (the last item always exists, or is a file).

    Args:
        path: A folder's path.

    Returns:
        Absolute paths; the last is the nearest existing ancestor (or `path` itself).
    """
    chain = [os.path.abspath(path)]
    while not os.path.lexists(chain[-1]):
        chain.append(os.path.dirname(chain[-1]))
    return chain


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a directory
        pass
    finally:
        os.close(fd)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """`payload` as indented JSON at `path` (a temporary path of `atomic_path`'s)."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)


def write_json_atomically(path: str, payload: dict[str, Any]) -> None:
    """`payload` as indented JSON at `path`, through `atomic_path`."""
    with atomic_path(path, ".json") as tmp:
        write_json(tmp, payload)


def save_model_atomically(model: Any, path: str) -> None:
    """`model.save(path)` through a temporary `.keras` file and a rename."""
    with atomic_path(path, ".keras") as tmp:
        model.save(tmp)
