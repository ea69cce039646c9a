"""Side-by-side timing on a noisy machine: the variants take turns in short blocks.

This machine's speed drifts by up to 2x within a minute, so timings taken in
separate processes, or one variant after the other, disagree run to run. Here
every round runs one block of each variant, the order rotating every round,
after unmeasured warm-up rounds; each round gives a ratio per variant to the
baseline, and the median ratio with its quartiles is what to quote.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import keras


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
    ratios = [a / b for a, b in zip(numerator, denominator)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3
