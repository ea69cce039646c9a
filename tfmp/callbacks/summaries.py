"""Scalars for TensorBoard (TensorFlow's tf.summary): the one TensorFlow-only part of the callbacks."""

from __future__ import annotations

import tensorflow as tf


class ScalarWriter:
    """Writes named scalars at a step to a TensorBoard log directory.

    Args:
        logdir: The directory (created if missing).
    """

    def __init__(self, logdir: str) -> None:
        self._writer = tf.summary.create_file_writer(logdir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Writes every `name: value` of `scalars` at `step`."""
        with self._writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)

    def close(self) -> None:
        self._writer.close()
