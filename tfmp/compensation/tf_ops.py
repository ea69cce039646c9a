"""What compensation needs from TensorFlow: the random bits stochastic rounding adds
(stateless random ops), and whether several replicas share the update.

Stateless: the bits are a function of a seed pair alone, so every replica of a
mirrored variable draws the same bits and rounds the same way (a stateful
generator per replica would let the copies drift apart), and a resumed run draws
what the uninterrupted run would have.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def random_bits(shape: Any, seed: Any, stream: Any) -> Any:
    """int32 values uniform over all 2**32 bit patterns, a function of `(seed, stream)` only:
    enough for three stochastic roundings (`tfmp.compensation.rounding.split_bits`).

    Args:
        shape: The shape to draw.
        seed: An integer scalar (the optimizer's rounding seed).
        stream: An integer scalar distinct for every write (step and variable).

    Returns:
        An int32 tensor of `shape`.
    """
    pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(stream, tf.int64)])
    return tf.random.stateless_uniform(shape, seed=pair, minval=None, maxval=None, dtype=tf.int32)


def several_replicas() -> bool:
    """True inside a `tf.distribute` strategy with more than one replica in sync."""
    return tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1
