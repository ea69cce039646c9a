"""What every part of the fence shares: the version it was read from, the upstream issues,
and the one error an internal that changed raises."""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import tensorflow as tf

CHECKED_WITH = "3.15.1"  # the Keras release every internal below was read from

ISSUE_MULTI_WORKER_FIT = "https://github.com/keras-team/keras/issues/20585"
ISSUE_ACCUMULATION_UNDER_STRATEGY = (
    "https://github.com/keras-team/keras/issues/20582 (PR https://github.com/keras-team/keras/pull/23592)")


class KerasInternalsChanged(RuntimeError):
    """A Keras (or TensorFlow) internal tfmp relies on is not what it was."""


def changed(what: str, error: BaseException) -> KerasInternalsChanged:
    return KerasInternalsChanged(
        f"tfmp relies on {what}, which Keras {keras.__version__} (TensorFlow {tf.__version__}) "
        f"does not provide as Keras {CHECKED_WITH} did ({type(error).__name__}: {error}); "
        "please report it with these versions")


@contextlib.contextmanager
def relying_on(what: str) -> Iterator[None]:
    try:
        yield
    except (AttributeError, ImportError) as e:
        raise changed(what, e) from None
