"""`HalfPrecisionCheckpoint`: Keras' `ModelCheckpoint`, writing 16-bit release weights."""

from __future__ import annotations

from typing import Any, Optional

import keras

from tfmp.weights.half import check_arguments, check_destination, write_weights


class _HalfWeightsWriter:
    """The model as `ModelCheckpoint` sees it: everything the model's, except that
    `save_weights` writes 16-bit weights (`tfmp.save_weights`, atomically)."""

    def __init__(self, model: keras.Model, dtype: str, keep_float32: Optional[str]) -> None:
        self._model, self._dtype, self._keep = model, dtype, keep_float32

    def save_weights(self, filepath: str, overwrite: bool = True, **kwargs: Any) -> None:
        check_destination(filepath, ".weights.h5")
        write_weights(self._model, filepath, self._dtype, self._keep, measure=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class HalfPrecisionCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that writes the weights in bfloat16 or float16.

    Same arguments, file naming (`"ckpt-{epoch:02d}-{val_loss:.3f}.weights.h5"`), best-only
    logic and save frequency as Keras' (weights only: the path must end in
    `.weights.h5`); each file is written by `tfmp.save_weights` (half the size,
    reloadable under any policy with `tfmp.load_weights` or Keras' `load_weights`),
    atomically: a run killed during a save leaves the previous file whole. For release
    weights; keep float32 backups (`BackupAndRestore`, `tfmp.callbacks.SafeBackupAndRestore`)
    for resuming, which this leaves alone.

    Args:
        filepath: Where to write, with Keras' `{epoch}` / `{batch}` / `{<metric>}` fields.
        dtype: `bfloat16` or `float16`.
        monitor, verbose, save_best_only, mode, save_freq, initial_value_threshold:
            As for `keras.callbacks.ModelCheckpoint`.
        keep_float32: float16: `"overflow"` keeps the variables float16 cannot hold in
            float32 in the file; None refuses them (training stops with the error).

    Raises:
        ValueError: a `filepath` not ending in `.weights.h5`, or a bad `dtype` or
            `keep_float32` (`tfmp.weights.WeightsFileError`).

    Example:
    >>> model.fit(x, y, validation_data=(vx, vy), callbacks=[
    ...     tfmp.callbacks.HalfPrecisionCheckpoint("best.weights.h5", "bfloat16",
    ...                                            monitor="val_loss", save_best_only=True)])
    """

    def __init__(self, filepath: str, dtype: str = "bfloat16", monitor: str = "val_loss",
                 verbose: int = 0, save_best_only: bool = False, mode: str = "auto",
                 save_freq: Any = "epoch", initial_value_threshold: Optional[float] = None,
                 keep_float32: Optional[str] = None) -> None:
        check_arguments(dtype, keep_float32)
        super().__init__(filepath, monitor=monitor, verbose=verbose,
                         save_best_only=save_best_only, save_weights_only=True, mode=mode,
                         save_freq=save_freq, initial_value_threshold=initial_value_threshold)
        self.dtype = dtype
        self.keep_float32 = keep_float32

    def set_model(self, model: keras.Model) -> None:
        super().set_model(_HalfWeightsWriter(model, self.dtype, self.keep_float32))
