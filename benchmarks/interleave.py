"""Side-by-side timing on a noisy machine: the variants take turns in short blocks.

This machine's speed drifts by up to 2x within a minute, so timings taken in
separate processes, or one variant after the other, disagree run to run. Here
every round runs one block of each variant, the order rotating every round,
after unmeasured warm-up rounds; each round gives a ratio per variant to the
baseline, and the median ratio with its quartiles is what to quote.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import keras
from absl import flags


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def define_flags(*, rounds: int, block: int, batch_size: int) -> None:
    """The flags every interleaved benchmark takes, with its own defaults.

    `--rounds`, `--block`, `--warmup`, `--batch_size`, `--precision` and `--clock`
    (`wall`: perf_counter; `cpu`: process CPU seconds, immune to the machine's stalls).
    """
    flags.DEFINE_integer("rounds", rounds, "Measured rounds (one block per arm each).")
    flags.DEFINE_integer("block", block, "Steps per block.")
    flags.DEFINE_integer("warmup", 3, "Unmeasured rounds first.")
    flags.DEFINE_integer("batch_size", batch_size, "Batch size.")
    flags.DEFINE_string("precision", "bf16", "Precision policy (tfmp.set_policy names).")
    flags.DEFINE_enum("clock", "wall", tuple(CLOCKS), "wall: perf_counter; cpu: process CPU "
                      "seconds (immune to the machine's stalls).")


class BlockTimer(keras.callbacks.Callback):
    """Seconds per step of one `fit` block, from the first to the last batch end.

    `fit`'s own set-up and the first step are excluded. `clock` is
    `time.perf_counter` (wall) or `time.process_time` (CPU seconds of the
    process: immune to the machine's stalls, blind to idle waits).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.clock = clock
        self.per_step = float("nan")

    def on_train_begin(self, logs=None) -> None:
        self.first = None

    def on_train_batch_end(self, batch, logs=None) -> None:
        now = self.clock()
        if self.first is None:
            self.first = now
        self.per_step = (now - self.first) / max(batch, 1)


def random_batches(features: int, batch_size: int, classes: int = 10) -> Any:
    """An endless `tf.data` pipeline over 8 batches of random vectors and labels."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    x = rng.rand(batch_size * 8, features).astype("float32")
    y = rng.randint(0, classes, len(x))
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat().prefetch(2)


def fit_block(model: keras.Model, data: Any, steps: int, clock: Callable[[], float],
              callbacks: Sequence[keras.callbacks.Callback] = ()) -> Callable[[], float]:
    """A block for `interleaved`: `steps` steps of `model.fit`, returning seconds per step."""

    def run() -> float:
        timer = BlockTimer(clock)
        model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0,
                  callbacks=[timer, *callbacks])
        return timer.per_step

    return run


def interleaved(blocks: dict[str, Callable[[], float]], rounds: int,
                warmup: int) -> dict[str, list[float]]:
    """Runs `warmup + rounds` rounds of every block; returns each one's measured times.

    Each block returns its own time per step. The order rotates every round so
    that no variant always runs first (or right after another).
    """
    names = list(blocks)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = blocks[name]()
            if i >= warmup:
                times[name].append(seconds)
    return times


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, ...]:
    """Median and quartiles of the per-round ratios `numerator[i] / denominator[i]`."""
    from tfmp.measure.stats import quartiles

    q1, median, q3 = quartiles([a / b for a, b in zip(numerator, denominator)])
    return median, q1, q3
