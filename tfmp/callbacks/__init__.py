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
from tfmp.callbacks.events import NanEvent, NonFiniteError
from tfmp.callbacks.monitors import LossScaleMonitor, NanMonitor

__all__ = ["BackupError", "Checkpoint", "HalfPrecisionCheckpoint", "LossScaleMonitor", "NanEvent",
           "NanMonitor", "NonFiniteError", "SafeBackupAndRestore", "inspect_backup"]
