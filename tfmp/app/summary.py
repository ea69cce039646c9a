"""The training job's summary as a person reads it in the terminal (`summary.json` holds it all)."""

from __future__ import annotations

from typing import Any, Optional

from tfmp.callbacks.counters import NAN_KEY, SCALE_KEY, SKIPPED_KEY

COUNTERS = (SCALE_KEY, SKIPPED_KEY, NAN_KEY)


def _epochs_line(completed: list[int], total: int, resumed: Optional[int]) -> str:
    """`epochs 1-3 of 3`, counted from 1 as a person counts them."""
    if not completed:
        return f"epochs none of {total} run"
    first, last = completed[0] + 1, completed[-1] + 1
    span = f"{first}" if first == last else f"{first}-{last}"
    return f"epochs {span} of {total}" + (f" (resumed after epoch {resumed})" if resumed else "")


def _share(value: Optional[float]) -> str:
    return "not measured" if value is None else f"{100 * value:.2g}%"


def human_summary(summary: dict[str, Any]) -> str:
    """The summary's facts as a few lines for the terminal."""
    scale = summary["loss_scale"]
    metrics = {**summary["final_train_metrics"],
               **{f"eval_{k}": v for k, v in summary["eval_metrics"].items()}}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                      if isinstance(v, (int, float)) and k not in COUNTERS)
    resumed = summary["resumed_from_epoch"]
    return "\n".join([
        "=== tfmp training summary ===",
        f"model {summary.get('model', summary['flags']['model'])} on {summary['dataset']}, "
        f"{summary['strategy']} x{summary['replicas']}" + (
            "" if not summary.get("cluster") else
            f" ({summary['cluster']['workers']} workers, this is {summary['cluster']['task']}, "
            f"global batch {summary['cluster']['global_batch']})"),
        f"precision {summary['policy']}{', XLA' if summary.get('jit_compile') else ''} "
        f"({summary['policy_source']}: {summary['policy_reason']})",
        _epochs_line(summary["epochs_completed"], summary["flags"]["epochs"], resumed),
        *([f"weights in {summary['weights_dtype']} (compensated optimizer; lost updates: "
           f"{_share(summary.get('lost_updates'))})"] if summary.get("weights_dtype") else []),
        *[f"kept in float32: {path} ({why})"
          for path, why in summary.get("float32_layers", {}).items()],
        f"throughput {summary['samples_per_sec']} samples/s ("
        f"{'epochs after the first' if len(summary['epochs_completed']) > 1 else 'one epoch, tracing included'})",
        f"metrics: {shown}",
        f"loss scale start={scale['loss_scale_start']:g} end={scale['loss_scale_end']:g} "
        f"min={scale['loss_scale_min']:g}; overflow steps skipped="
        f"{summary['overflow_steps_skipped']}; NaN losses={summary['nan_losses']}; "
        f"NaN events={len(summary['nan_events'])}",
    ])
