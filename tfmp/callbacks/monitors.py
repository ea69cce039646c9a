"""`model.fit` callbacks: `LossScaleMonitor` and `NanMonitor`.

Both attach a `ScaleCounters` metric to the model, so every train step returns `loss_scale`,
`skipped_steps` and `nan_losses` in its logs, fetched with the values Keras already syncs every
batch: no extra device round trip and no extra gradient check. The progress bar, `History`,
`CSVLogger` and the stock `TensorBoard` callback show them with no extra code.
"""

from __future__ import annotations

import collections
from typing import Any, Optional, Sequence

import keras
from absl import logging

from tfmp import _compat
from tfmp._messages import warn
from tfmp.callbacks.counters import (
    LOST_KEY,
    NAN_KEY,
    SCALE_KEY,
    SKIPPED_KEY,
    UNKNOWN,
    ScaleState,
    attach_scale_counters,
    first_nonfinite_variable,
    is_finite_number,
    read_scale_state,
    readable_counters,
)
from tfmp.callbacks.culprit import find_culprit, keep_bad_batches, not_kept_because
from tfmp.callbacks.events import (
    NONFINITE_LOSS,
    SCALE_AT_MINIMUM,
    Evidence,
    NanEvent,
    NonFiniteError,
    diagnose,
)
from tfmp.callbacks.lost_updates import (DEFAULT_LOST_WARN, lost_updates_warning,
                                         uncompensated_half_weights)
from tfmp.callbacks.summaries import ScalarWriter
from tfmp.compensation.optimizer import compensated_part
from tfmp.precision import HardwareInfo, detect_hardware
from tfmp.precision.policy import global_policy_name
from tfmp.rewrite.replay import half_dtypes
from tfmp.scaling import build_optimizer, guard_model_state

NAN_POLICIES = ("skip", "stop", "raise")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {name}={value!r}.")


def _learning_rate(optimizer: Any) -> Optional[float]:
    """The optimizer's learning rate now (a schedule's current value), or None."""
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except Exception:  # noqa: BLE001 (no learning rate, or not a number: not said)
        return None


class _CountersCallback(keras.callbacks.Callback):
    """Attaches the counters metric and tracks the global step on the host.

    The starting state is read when the first epoch begins, after every
    callback's `on_train_begin`: a `BackupAndRestore` listed after the monitor
    has restored the optimizer by then, so the list order does not matter.
    """

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        attach_scale_counters(model)
        guard_model_state(model)

    def on_train_begin(self, logs=None) -> None:
        build_optimizer(self.model)  # before the step is traced: Keras then traces it once
        self._begin_state: Optional[ScaleState] = None
        self._epoch = 0

    def _ensure_started(self) -> None:
        if self._begin_state is not None:
            return
        self._begin_state = read_scale_state(self.model.optimizer)  # once per fit
        self._step = self._epoch_step = self._begin_state.steps
        self._last = {SCALE_KEY: self._begin_state.scale,
                      SKIPPED_KEY: max(self._begin_state.skipped_steps, 0),
                      NAN_KEY: max(self._begin_state.nonfinite_losses, 0)}
        inner = compensated_part(self.model.optimizer)
        if inner is not None and inner.measures_lost_updates:
            self._last[LOST_KEY] = 0.0
        self._started()

    def _started(self) -> None:
        """Hook: the starting state has just been read."""

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._ensure_started()
        self._epoch = epoch
        self._epoch_step = self._step

    def on_epoch_end(self, epoch, logs=None) -> None:
        readable_counters(logs)

    def _advance(self, batch: int, logs: Optional[dict]) -> dict[str, float]:
        """Updates the global step; returns the counters in `logs` (last known if absent)."""
        self._ensure_started()
        readable_counters(logs)
        self._step = self._epoch_step + batch + 1
        current = {k: float(logs[k]) for k in self._last if logs and k in logs}
        previous, self._last = self._last, {**self._last, **current}
        return previous


class LossScaleMonitor(_CountersCallback):
    """Shows `loss_scale`, `skipped_steps`, `nan_losses` (and `lost_updates`) and warns.

    Every batch's and epoch's logs get the three counters (through a metric the
    callback attaches to the model). Works with any optimizer: without loss
    scaling the scale is 1, and skipped steps are still counted under the NaN
    guard (`tfmp.wrap_optimizer(..., guard=True)`).

    Args:
        warn_below: Warn (once per episode) when a dynamic scale falls below this.
        log_every: Check warnings and write TensorBoard scalars every N-th
            batch-end call (1 = each).
        tensorboard_dir: If set, also write `loss_scale` / `skipped_steps`
            scalars there (the stock `TensorBoard` callback sees the logs anyway).
        backoff_window: Steps over which back-offs are counted.
        backoff_warn: Warn (once per episode) after this many back-offs in the window.
        lost_warn: With 16-bit weights and a compensated optimizer (`tfmp.compensate`),
            warn (once per fit) when `lost_updates` passes this share. With 16-bit
            weights and an optimizer that does not compensate, a warning at the start.

    After training, `summary` (a dict; also `logs["tfmp_summary"]` at
    `on_train_end`) holds the policy, scale start/end/min, overflow steps skipped
    and their share, NaN losses and `lost_updates` (the last sampled share; None
    without a compensated optimizer); one line is logged through absl.

    Example:
    >>> model.fit(x, y, callbacks=[tfmp.callbacks.LossScaleMonitor(), keras.callbacks.CSVLogger("log.csv")])
    """

    def __init__(self, warn_below: float = 1024.0, log_every: int = 1,
                 tensorboard_dir: Optional[str] = None, backoff_window: int = 200,
                 backoff_warn: int = 3, lost_warn: float = DEFAULT_LOST_WARN) -> None:
        super().__init__()
        if isinstance(lost_warn, str) or not (is_finite_number(lost_warn) and 0 <= lost_warn <= 1):
            raise ValueError(f"`lost_warn` must be a share in [0, 1]; got lost_warn={lost_warn!r}.")
        self.lost_warn = float(lost_warn)
        if not is_finite_number(warn_below) or isinstance(warn_below, str) or warn_below < 0:
            raise ValueError(f"`warn_below` must be a number >= 0; got warn_below={warn_below!r}.")
        for name, value in (("log_every", log_every), ("backoff_window", backoff_window),
                            ("backoff_warn", backoff_warn)):
            _check_positive_int(name, value)
        self.warn_below = float(warn_below)
        self.log_every = log_every
        self.tensorboard_dir = tensorboard_dir
        self.backoff_window = backoff_window
        self.backoff_warn = backoff_warn
        self.summary: dict[str, Any] = {}

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        self._backoffs: collections.deque[int] = collections.deque()
        self._low_warned = self._backoff_warned = self._lost_warned = False
        message = uncompensated_half_weights(self.model)
        if message:
            warn(message)
        self._calls = 0
        self._writer = ScalarWriter(self.tensorboard_dir) if self.tensorboard_dir else None

    def _started(self) -> None:
        self._min_scale = self._last[SCALE_KEY]

    def on_train_batch_end(self, batch, logs=None) -> None:
        previous = self._advance(batch, logs)
        scale = self._last[SCALE_KEY]
        self._min_scale = min(self._min_scale, scale)
        if scale < previous[SCALE_KEY]:
            self._backoffs.append(self._step)
        self._calls += 1
        if self._calls % self.log_every:
            return
        while self._backoffs and self._backoffs[0] <= self._step - self.backoff_window:
            self._backoffs.popleft()
        if self._begin_state.dynamic:
            self._check_warnings(scale)
        if self._last.get(LOST_KEY, 0.0) > self.lost_warn and not self._lost_warned:
            self._lost_warned, lost = True, self._last[LOST_KEY]
            warn(lost_updates_warning(self.model.optimizer, lost, self._step))
        if self._writer is not None:
            shown = (SCALE_KEY, SKIPPED_KEY, LOST_KEY)
            self._writer.write(self._step, {k: self._last[k] for k in shown if k in self._last})

    def _check_warnings(self, scale: float) -> None:
        def where() -> str:  # reads the optimizer: only when warning
            variable = first_nonfinite_variable(self.model.optimizer) or "unknown"
            return f"at step {self._step} (first non-finite variable: {variable})"

        if scale < self.warn_below and not self._low_warned:
            self._low_warned = True
            warn(f"tfmp: loss scale fell to {scale:g}, below {self.warn_below:g}, {where()}: "
                 "gradients keep overflowing in float16")
        elif scale >= self.warn_below:
            self._low_warned = False
        if len(self._backoffs) >= self.backoff_warn and not self._backoff_warned:
            self._backoff_warned = True
            warn(f"tfmp: loss scale backed off {len(self._backoffs)} times within "
                 f"{self.backoff_window} steps, now {scale:g}, {where()}")
        elif not self._backoffs:
            self._backoff_warned = False

    def on_train_end(self, logs=None) -> None:
        self._ensure_started()
        end = read_scale_state(self.model.optimizer)
        start = self._begin_state
        steps = max(end.steps - start.steps, 0)
        nan_losses = (end.nonfinite_losses - start.nonfinite_losses
                      if start.nonfinite_losses != UNKNOWN else UNKNOWN)
        skipped = (end.skipped_steps - start.skipped_steps
                   if start.skipped_steps != UNKNOWN else 0)
        overflow = max(skipped - max(nan_losses, 0), 0)
        self.summary = {
            "policy": global_policy_name(),
            "loss_scale_start": start.scale,
            "loss_scale_end": end.scale,
            "loss_scale_min": min(self._min_scale, end.scale),
            "overflow_steps_skipped": overflow,
            "overflow_share": overflow / steps if steps else 0.0,
            "steps": steps,
            "start_step": start.steps,
            "nan_losses": nan_losses,
            "lost_updates": self._last.get(LOST_KEY),
        }
        s = self.summary
        logging.info(
            "tfmp summary: policy=%s loss_scale start=%g end=%g min=%g, overflow steps "
            "skipped=%d (%.2f%% of %d), NaN losses=%s%s",
            s["policy"], s["loss_scale_start"], s["loss_scale_end"], s["loss_scale_min"],
            overflow, 100 * s["overflow_share"], steps,
            "unknown" if nan_losses == UNKNOWN else nan_losses,
            "" if s["lost_updates"] is None else f", lost updates={s['lost_updates']:.2%}",
        )
        if logs is not None:
            logs["tfmp_summary"] = dict(self.summary)
        if self._writer is not None:
            self._writer.close()


class NanMonitor(_CountersCallback):
    """Tells recoverable float16 overflow from divergence and bad data.

    - Overflow (the loss-scale optimizer skipped a step): counted in
      `overflow_steps`, logged, training goes on.
    - Non-finite loss (bad data or divergence), or gradients overflowing with
      the scale pinned at its minimum for `patience` steps in a row: an event.
      After `patience` consecutive events, `on_nan` decides.

    The event says what the cause is, found by running the bad batch again (kept on
    the host only on a skipped step: `tfmp.callbacks.culprit`; not under XLA or on a
    TPU): `kind="data"` when the batch itself holds inf/NaN; `"divergence"` when the
    same batch with the same weights goes non-finite in float32 too (the learning rate,
    no clipping: precision is not the cause); `"precision"` only when float32 is finite
    where 16 bits is not, naming the first layer that made inf/NaN from finite inputs
    and suggesting `float32_layers=[...]`; `"unverified"` when nothing could be run
    again. It never suggests the precision the run already uses, nor bfloat16 on
    hardware without it.

    Args:
        on_nan: `"skip"` logs the event and continues; `"stop"` stops training
            with one diagnostic message; `"raise"` raises `tfmp.NonFiniteError`.
        patience: Consecutive events (batch-end calls) before acting.
        protect: `BackupAndRestore` / `ModelCheckpoint` callbacks whose saved
            state must survive the stop: their end-of-epoch save and the
            backup's deletion at the end of training are suppressed, so the
            next run resumes from the last good save. Restored on the next
            `on_train_begin`.
        hardware: The `tfmp.HardwareInfo` the advice is for (default: detected at
            the first event); bfloat16 is suggested only where it is native.

    Without a `tfmp.DynamicLossScaleOptimizer`, a NaN loss is read from
    `logs["loss"]`, which Keras averages over the epoch: after one bad batch
    every later batch of that epoch counts as an event.

    Example:
    >>> backup = keras.callbacks.BackupAndRestore("backup")
    >>> model.fit(x, y, callbacks=[tfmp.callbacks.NanMonitor("stop", protect=[backup]), backup])
    """

    def __init__(self, on_nan: str = "stop", patience: int = 1,
                 protect: Sequence[keras.callbacks.Callback] = (),
                 hardware: Optional[HardwareInfo] = None) -> None:
        super().__init__()
        if on_nan not in NAN_POLICIES:
            raise ValueError(f"on_nan={on_nan!r} is not accepted; use one of {', '.join(NAN_POLICIES)}.")
        _check_positive_int("patience", patience)
        self.on_nan = on_nan
        self.patience = patience
        self.protect = list(protect)
        if hardware is not None and not isinstance(hardware, HardwareInfo):
            raise ValueError(f"hardware must be a tfmp.HardwareInfo; got {hardware!r}.")
        self.hardware = hardware
        self.events: list[NanEvent] = []
        self.overflow_steps = 0
        self.stopped_event: Optional[NanEvent] = None
        self._patched: list[tuple[Any, dict[str, Any]]] = []

    def on_train_begin(self, logs=None) -> None:
        for callback, saved in self._patched:  # undo a previous stop's protection
            for name, value in saved.items():
                setattr(callback, name, value)
        self._patched = []
        super().on_train_begin(logs)
        self._consecutive = self._pinned = 0
        self.stopped_event = None

    def on_train_batch_end(self, batch, logs=None) -> None:
        logs = logs or {}
        prev = self._advance(batch, logs)
        now = self._last
        if NAN_KEY in logs:
            nan_loss = now[NAN_KEY] > prev[NAN_KEY]
        else:
            nan_loss = "loss" in logs and not is_finite_number(logs["loss"])
        skipped = int(max(now[SKIPPED_KEY] - prev[SKIPPED_KEY], 0))
        # Overflowed *at* the floor: the scale was already there before this step.
        state = self._begin_state
        at_min = state.dynamic and max(prev[SCALE_KEY], now[SCALE_KEY]) <= state.min_scale
        kind = None
        if nan_loss:
            self._consecutive += 1
            self._pinned = 0
            kind = NONFINITE_LOSS if self._consecutive >= self.patience else None
        elif skipped:
            self.overflow_steps += skipped
            self._consecutive = 0
            self._pinned = self._pinned + 1 if at_min else 0
            logging.info("tfmp: float16 overflow, step skipped (%d so far), loss scale now %g",
                         self.overflow_steps, now[SCALE_KEY])
            kind = SCALE_AT_MINIMUM if self._pinned >= self.patience else None
        else:
            self._consecutive = self._pinned = 0
        if kind:
            self._act(self._event(kind, batch, logs))

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        keep_bad_batches(model)

    def _event(self, trigger: str, batch: int, logs: dict) -> NanEvent:
        optimizer = self.model.optimizer
        variable = first_nonfinite_variable(optimizer)
        # Only now: the bad batch run again, as it ran and in float32.
        culprit = find_culprit(self.model, gradients=trigger == SCALE_AT_MINIMUM)
        replay = culprit.float32 if culprit else None
        halves = half_dtypes(self.model)  # what any layer computes in, not the most of them
        half = "float16" if "float16" in halves else "bfloat16" if halves else None
        self.hardware = self.hardware or detect_hardware()
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        kind, cause, fix = diagnose(Evidence(
            trigger, half, variable,
            self._begin_state.min_scale, self._pinned,
            bad_inputs=culprit.bad_inputs if culprit else None,
            layer=culprit.layer if culprit else None,
            float32_finite=replay.finite if replay else None,
            float32_layer=replay.origins[0] if replay and replay.origins else None,
            float32_op=replay.origin_op if replay else None,
            largest_weight=culprit.largest_weight if culprit else None,
            nonfinite_weights=culprit.nonfinite_weights if culprit else (),
            learning_rate=_learning_rate(inner),
            clipping=any(getattr(inner, name, None) for name in ("clipnorm", "clipvalue",
                                                                 "global_clipnorm")),
            bfloat16_fast=self.hardware.recommended_policy == "mixed_bfloat16",
            not_kept=not_kept_because(self.model)))
        loss = logs.get("loss")
        return NanEvent(kind, trigger, self._epoch, batch, self._step,
                        None if loss is None else float(loss), self._last[SCALE_KEY],
                        int(self._last[SKIPPED_KEY]), variable, cause, fix,
                        culprit.layer if culprit else None, bool(culprit and culprit.bad_inputs))

    def _act(self, event: NanEvent) -> None:
        self.events.append(event)
        self._consecutive = self._pinned = 0
        if self.on_nan == "skip":
            logging.warning("%s Continuing (on_nan='skip').", event.message())
            return
        self.stopped_event = event
        self._protect()
        if self.on_nan == "raise":
            raise NonFiniteError(event)
        logging.error("%s Training stopped (on_nan='stop').", event.message())
        self.model.stop_training = True

    def _protect(self) -> None:
        for callback in self.protect:
            self._patched.append((callback, _compat.suspend_saving(callback)))
