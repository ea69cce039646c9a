"""Measuring precision on the user's own model: the float32-vs-mixed A/B check and the tuned choice.

`compare_precision` trains one model under several policies from identical weights
on identical batches, the policies taking turns step by step; `tune` picks the
fastest policy whose numerics pass; both train with the loss `losses.choose_loss` picks
(given, compiled, or one matching the model's output); `stats.quartiles` summarizes ratios
measured side by side; `plot_comparison` draws a comparison (matplotlib).
"""

from tfmp.measure.comparison import Comparison, PolicyRun, Verdict, compare_precision
from tfmp.measure.plot import plot_comparison
from tfmp.measure.tuning import TuneResult, tune

__all__ = ["Comparison", "PolicyRun", "TuneResult", "Verdict", "compare_precision",
           "plot_comparison", "tune"]
