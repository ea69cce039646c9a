"""The one plot: a comparison's loss per policy over the steps, and its loss scale (matplotlib)."""

from __future__ import annotations

from tfmp.atomic import atomic_path
from tfmp.measure.comparison import Comparison


def plot_comparison(comparison: Comparison, path: str) -> None:
    """Writes a PNG: the loss of every policy over the steps, and the loss scale.

    Written through a temporary file and a rename (never half a file at `path`).

    Args:
        comparison: What `compare_precision` returned.
        path: The PNG file to write.

    Raises:
        ImportError: matplotlib is not installed (one line naming tfmp's `plot` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError:
        raise ImportError("the comparison plot needs matplotlib: pip install -e \".[plot]\"") from None
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 6),
                                            gridspec_kw={"height_ratios": [3, 1]})
    styles = ("-", "--", ":", "-.")  # policies that agree draw on top of each other
    for i, run in enumerate(comparison.runs):
        label, style = f"{run.label} ({run.policy})", styles[i % len(styles)]
        top.plot(range(len(run.losses)), run.losses, style, label=label)
        bottom.plot(range(len(run.loss_scales)), run.loss_scales, style, label=label)
    top.set_ylabel("training loss")
    top.set_title(f"tfmp compare_precision ({'pass' if comparison.ok else 'FAIL'}, "
                  f"tolerance {comparison.tolerance:g})")
    top.legend()
    bottom.set_ylabel("loss scale")
    bottom.set_yscale("log", base=2)
    bottom.set_xlabel("step")
    figure.tight_layout()
    with atomic_path(path, ".png") as tmp:
        figure.savefig(tmp, format="png")
    pyplot.close(figure)
