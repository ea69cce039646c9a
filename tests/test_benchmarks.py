"""benchmarks/interleave.py: the rotation and the ratio summary every benchmark relies on."""

import pytest

from benchmarks import interleave


def test_variants_take_turns_and_warmup_is_dropped():
    calls = []

    def block(name, seconds):
        def run():
            calls.append(name)
            return seconds + len(calls)  # a machine that slows down round after round
        return run

    times = interleave.interleaved({"a": block("a", 0.0), "b": block("b", 0.0)}, rounds=3,
                                   warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # who goes first rotates
    assert times == {"a": [4, 5, 8], "b": [3, 6, 7]}  # the warm-up round is not kept


def test_ratio_summary_is_the_median_of_per_round_ratios():
    median, q1, q3 = interleave.ratio_summary([2.0, 4.0, 6.0, 8.0, 10.0], [1.0] * 5)
    assert (median, q1, q3) == (6.0, 4.0, 8.0)
    # A drift that hits both arms of a round alike cancels out of the ratio.
    median, _, _ = interleave.ratio_summary([1.0, 2.0, 4.0], [2.0, 4.0, 8.0])
    assert median == pytest.approx(0.5)
