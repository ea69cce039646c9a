"""`model.fit` callbacks: `LossScaleMonitor`, `NanMonitor` and `SafeBackupAndRestore`.

Both attach a small metric to the model (`counters.ScaleCounters`), so every train
step returns `loss_scale`, `skipped_steps` and `nan_losses` with the values Keras
already fetches each batch: the progress bar, `History`, `CSVLogger` and the stock
`TensorBoard` callback show them, and no extra device read or gradient check is made.
`SafeBackupAndRestore` is Keras' `BackupAndRestore` with crash-safe saves and a checked
restore; `HalfPrecisionCheckpoint` is Keras' `ModelCheckpoint` writing 16-bit release
weights.
"""

from tfmp.callbacks.backup import BackupError, Checkpoint, SafeBackupAndRestore, inspect_backup
from tfmp.callbacks.checkpoint import HalfPrecisionCheckpoint
from tfmp.callbacks.counters import ScaleCounters, ScaleState, read_scale_state
from tfmp.callbacks.events import NanEvent, NonFiniteError
from tfmp.callbacks.monitors import NAN_POLICIES, LossScaleMonitor, NanMonitor

__all__ = ["BackupError", "Checkpoint", "HalfPrecisionCheckpoint", "LossScaleMonitor", "NAN_POLICIES", "NanEvent",
           "NanMonitor", "NonFiniteError", "SafeBackupAndRestore", "ScaleCounters", "ScaleState",
           "inspect_backup", "read_scale_state"]
