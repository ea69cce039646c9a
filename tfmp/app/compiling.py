"""How the training job compiles the model it trains, and the check that the data fits it.

The loss and metrics come from `--loss` / `--metrics`, else from the model's own `compile()`
(a compiled model or `.keras` file keeps them), else, for a reference model, sparse
categorical cross-entropy on logits and accuracy. The optimizer is `--optimizer` (any Keras
optimizer name) at `--learning_rate`, else a new copy of the compiled model's own (its
learning rate replaced by `--learning_rate` if given), else Adam.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfmp._compat import compile_arguments
from tfmp._messages import first_line
from tfmp.app.config import DEFAULT_LEARNING_RATE, ConfigError, TrainConfig, optimizer_class
from tfmp.app.data import Data, DatasetError
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
    accumulate = {"gradient_accumulation_steps": config.grad_accum_steps
                  if config.grad_accum_steps > 1 else None}
    rate = {} if config.learning_rate is None else {"learning_rate": config.learning_rate}
    if config.optimizer or own is None:
        cls = optimizer_class(config.optimizer or "adam")
        return lambda: cls(**{"learning_rate": DEFAULT_LEARNING_RATE, **rate, **accumulate})
    if isinstance(own, str):
        own = keras.optimizers.get(own)
    while isinstance(own, (keras.optimizers.LossScaleOptimizer, DynamicLossScaleOptimizer)):
        own = own.inner_optimizer  # tfmp.prepare wraps it as the run's policy needs
    cls, settings = type(own), own.get_config()
    return lambda: cls.from_config({**settings, **rate, **accumulate})


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
        DatasetError: the model fails on it (the inputs do not fit), in one line.
    """
    x = next(iter(data.train.take(1)))[0]
    try:
        return model(x, training=False)
    except Exception as e:  # noqa: BLE001 (the model's own code may raise anything)
        raise DatasetError(f"{data.name}'s inputs do not fit the model: {type(e).__name__}: "
                           f"{first_line(e)}") from None


def check_fit(model: keras.Model, data: Data) -> None:
    """The data against the compiled model, before training: the first batch's inputs run
    through the model and its loss is computed (shapes, dtypes, structure), and with a sparse
    categorical loss the labels of the first `CHECKED_BATCHES` batches are class indices
    below the number of outputs.

    Raises:
        DatasetError: in one line, what does not fit.
    """
    batches = list(data.train.take(CHECKED_BATCHES))
    x, y, *weights = batches[0]
    prediction = first_batch_through(model, data)
    _check_labels(model, data.name, [b[1] for b in batches], prediction)
    try:
        loss = model.compute_loss(x, y, prediction, weights[0] if weights else None)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{data.name}'s labels do not fit the model's outputs and loss: "
                           f"{type(e).__name__}: {first_line(e)}") from None
    if not np.isfinite(float(loss)):
        raise DatasetError(f"{data.name}'s first batch gives a non-finite loss ({float(loss)}) "
                           "with the initial weights: check its inputs and labels for NaN/inf")


def _check_labels(model: keras.Model, name: str, labels: list, prediction: Any) -> None:
    loss = compile_arguments(model).get("loss")
    sparse = (isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
              or (isinstance(loss, str) and "sparse_categorical" in loss))
    if not sparse or not isinstance(prediction, (tf.Tensor, np.ndarray)) or not labels:
        return
    classes = int(prediction.shape[-1])
    values = np.concatenate([np.asarray(y).reshape(-1) for y in labels])
    low, high = values.min(), values.max()
    if not np.all(values == np.round(values)) or low < 0 or high >= classes:
        raise DatasetError(f"{name}'s labels range over [{low:g}, {high:g}], but a sparse "
                           f"categorical loss takes class indices 0..{classes - 1} for the "
                           f"model's {classes} outputs: give labels that fit, or a model with "
                           "as many outputs as classes")


def describe(compiled: Compilation, optimizer: keras.optimizers.Optimizer) -> str:
    """One line for the log: loss, metrics and optimizer, and where they came from."""
    name = getattr(compiled.loss, "name", None) or getattr(compiled.loss, "__name__", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # the loss-scale optimizer's
    return (f"loss {name or compiled.loss}, metrics {compiled.metrics or []}, optimizer "
            f"{type(inner).__name__.removeprefix('Compensated')} ({compiled.source})")
