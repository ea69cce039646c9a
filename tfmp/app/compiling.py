"""How the training job compiles the model it trains, and the check that the data fits it.

The loss and metrics come from `--loss` / `--metrics`, else from the model's own `compile()`
(a compiled model or `.keras` file keeps them), else, for a reference model, sparse
categorical cross-entropy on logits and accuracy. The optimizer is `--optimizer` (any Keras
optimizer name) at `--learning_rate`, else a new copy of the compiled model's own (its
learning rate replaced by `--learning_rate` if given), else Adam.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmp._compat import compile_arguments
from tfmp._messages import first_line
from tfmp.app.config import DEFAULT_LEARNING_RATE, ConfigError, TrainConfig, optimizer_class
from tfmp.app.data import Data, DatasetError
from tfmp.compensation.factory import plain_copy
from tfmp.scaling import DynamicLossScaleOptimizer

CHECKED_BATCHES = 8  # the batches whose labels are checked against the model's outputs


@dataclasses.dataclass(frozen=True)
class Compilation:
    """The loss, metrics and optimizer a run compiles its model with.

    Attributes:
        loss, metrics, weighted_metrics, loss_weights: As for `keras.Model.compile`.
        optimizer: Returns a new, unbuilt optimizer at each call (tune measures several).
        source: Where they came from, for the log: `flags`, `the model's compile()`,
            `reference`.
    """

    loss: Any
    metrics: Any
    weighted_metrics: Any
    loss_weights: Any
    optimizer: Callable[[], keras.optimizers.Optimizer]
    source: str

    def compile(self, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                jit_compile: bool) -> None:
        """`model.compile` with these and `optimizer` (prepared by `tfmp.prepare`)."""
        model.compile(optimizer, loss=self.loss, metrics=self.metrics,
                      weighted_metrics=self.weighted_metrics, loss_weights=self.loss_weights,
                      jit_compile=jit_compile)


def compilation(model: keras.Model, config: TrainConfig, reference: bool) -> Compilation:
    """What `model` is compiled with in this run (see the module's docstring).

    Args:
        model: The model as built or loaded (compiled or not).
        config: The run's configuration.
        reference: Whether it is a reference model.

    Returns:
        The `Compilation`.

    Raises:
        ConfigError: no loss (an uncompiled model without `--loss`).
    """
    given = compile_arguments(model)
    if config.loss:
        loss, metrics, source = config.loss, list(config.metrics), "flags"
    elif given.get("loss") is not None:
        loss, source = given["loss"], "the model's compile()"
        metrics = list(config.metrics) if config.metrics else given.get("metrics")
    elif reference:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics, source = list(config.metrics) or ["accuracy"], "reference"
    else:
        raise ConfigError(f"--model={config.model} is not compiled: give --loss (a Keras loss "
                          "name, e.g. sparse_categorical_crossentropy or mse) and optionally "
                          "--metrics")
    keep = source == "the model's compile()"
    return Compilation(loss, metrics, given.get("weighted_metrics") if keep else None,
                       given.get("loss_weights") if keep else None,
                       _optimizer_factory(config, given.get("optimizer")), source)


def _optimizer_factory(config: TrainConfig,
                       own: Any) -> Callable[[], keras.optimizers.Optimizer]:
    overrides = {} if config.learning_rate is None else {"learning_rate": config.learning_rate}
    if config.grad_accum_steps > 1:  # else a compiled optimizer keeps its own accumulation
        overrides["gradient_accumulation_steps"] = config.grad_accum_steps
    if config.optimizer or own is None:
        cls = optimizer_class(config.optimizer or "adam")
        return lambda: cls(**{"learning_rate": DEFAULT_LEARNING_RATE, **overrides})
    if isinstance(own, str):
        own = keras.optimizers.get(own)
    while isinstance(own, (keras.optimizers.LossScaleOptimizer, DynamicLossScaleOptimizer)):
        own = own.inner_optimizer  # tfmp.prepare wraps it as the run's policy needs

    def copy() -> keras.optimizers.Optimizer:
        try:
            return plain_copy(own, **overrides)
        except Exception as e:  # noqa: BLE001 (a class of the user's own may raise anything)
            raise ConfigError(f"the model's optimizer {type(own).__name__} cannot be copied for "
                              f"this run ({first_line(e, typed=True)}): give "
                              "--optimizer") from None

    copy()  # refused now, before anything is built
    return copy


def build_on(model: keras.Model, data: Data) -> None:
    """Builds an unbuilt model (a subclassed one) on the data's first batch, by calling it:
    what `tfmp.prepare` and the optimizer need.

    Raises:
        DatasetError: calling the model on that batch fails (the data does not fit it).
    """
    if not model.built:
        first_batch_through(model, data)


def first_batch_through(model: keras.Model, data: Data) -> Any:
    """The model's output on the data's first training batch (inference mode).

    Raises:
        DatasetError: the data yields no batch, or the model fails on it, in one line.
    """
    return _run(model, data.name, _batches(data.train, data.name, "training", 1)[0])


def _batches(ds: Any, name: str, which: str, count: int) -> list:
    """The first `count` batches of `ds` (at least one, else `DatasetError`)."""
    batches = list(ds.take(count))
    if not batches:
        raise DatasetError(f"{name}'s {which} dataset yields no batch")
    return batches


def _run(model: keras.Model, name: str, batch: tuple) -> Any:
    try:
        return model(batch[0], training=False)
    except Exception as e:  # noqa: BLE001 (the model's own code may raise anything)
        raise DatasetError(f"{name}'s inputs do not fit the model: {type(e).__name__}: "
                           f"{first_line(e)}") from None


def check_fit(model: keras.Model, data: Data, batch_size: Optional[int] = None) -> None:
    """The data against the compiled model, before training: the first training batch and the
    first evaluation batch run through the model, its loss and its metrics (shapes, dtypes,
    structure), and with a sparse categorical loss the labels of the first `CHECKED_BATCHES`
    batches of each are class indices below the number of outputs.

    Args:
        model: The compiled model.
        data: The data.
        batch_size: The global batch size the run counts with: a warning when the first
            training batch holds another number of examples.

    Raises:
        DatasetError: in one line, what does not fit.
    """
    splits = [("training", data.train)] + ([("evaluation", data.eval)] if data.eval else [])
    for which, ds in splits:
        batches = _batches(ds, data.name, which, CHECKED_BATCHES)
        x, y, *weights = batches[0]
        held = keras.tree.flatten(x)[0].shape[0]
        if which == "training" and batch_size and held != batch_size:
            logging.warning("tfmp: %s's first training batch holds %s examples, not "
                            "--batch_size=%d: it batches on its own, and the summary's "
                            "samples/s and global batch count %d per step", data.name, held,
                            batch_size, batch_size)
        prediction = _run(model, data.name, batches[0])
        _check_labels(model, f"{data.name}'s {which}", [b[1] for b in batches], prediction)
        try:
            loss = model.compute_loss(x, y, prediction, weights[0] if weights else None)
            model.compute_metrics(x, y, prediction, weights[0] if weights else None)
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"{data.name}'s {which} labels do not fit the model's outputs, "
                               f"loss or metrics: {first_line(e, typed=True)}") from None
        finally:
            model.reset_metrics()
        if not np.isfinite(float(loss)):
            raise DatasetError(f"{data.name}'s first {which} batch gives a non-finite loss "
                               f"({float(loss)}) with the initial weights: check its inputs "
                               "and labels for NaN/inf")


def _sparse(loss: Any) -> tuple[bool, Optional[int]]:
    """Whether a loss takes class indices (sparse categorical cross-entropy in any spelling),
    and the class it ignores."""
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return True, loss.ignore_class
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", "")
    return name.replace("_", "").lower() == "sparsecategoricalcrossentropy", None


def _check_labels(model: keras.Model, name: str, labels: list, prediction: Any) -> None:
    sparse, ignored = _sparse(compile_arguments(model).get("loss"))
    if not sparse or not isinstance(prediction, (tf.Tensor, np.ndarray)):
        return
    values = np.concatenate([np.asarray(y).reshape(-1) for y in labels])
    if values.dtype.kind not in "iuf":
        return  # not numbers: the loss itself refuses them (check_fit)
    values = values[values != ignored] if ignored is not None else values
    classes = int(prediction.shape[-1])
    if values.size and (not np.all(values == np.round(values)) or values.min() < 0
                        or values.max() >= classes):
        raise DatasetError(f"{name} labels range over [{values.min():g}, {values.max():g}], "
                           f"but a sparse categorical loss takes class indices 0..{classes - 1} "
                           f"for the model's {classes} outputs: give labels that fit, or a "
                           "model with as many outputs as classes")


def describe(compiled: Compilation, optimizer: keras.optimizers.Optimizer) -> str:
    """One line for the log: loss, metrics and optimizer, and where they came from."""
    name = getattr(compiled.loss, "name", None) or getattr(compiled.loss, "__name__", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # the loss-scale optimizer's
    return (f"loss {name or compiled.loss}, metrics {compiled.metrics or []}, optimizer "
            f"{type(inner).__name__.removeprefix('Compensated')} ({compiled.source})")
