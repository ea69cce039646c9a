"""A skipped step changes no model state: forward-pass updates are rolled back.

`DynamicLossScaleOptimizer` skips the optimizer update when a gradient is not
finite, but some layers write state in the forward pass itself:
`BatchNormalization` assigns `moving_mean` / `moving_variance` before any
gradient exists, so one NaN batch would write NaN into them in every
precision. `guard_model_state(model)` wraps the model's train step so that the
non-trainable weights of its trainable layers are read before the step and
written back when the optimizer skipped it.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from tfmp import _compat
from tfmp.scaling.building import build_optimizer
from tfmp.scaling.optimizer import DynamicLossScaleOptimizer

_MARK = "_tfmp_state_guard"


def forward_state(model: keras.Model) -> list[keras.Variable]:
    """The variables a train step may change outside the optimizer.

    The non-trainable weights of trainable layers (BatchNormalization's moving
    statistics and the like). Frozen layers do not update theirs, so they are
    left out: copying a frozen backbone every step would cost its size.

    Args:
        model: A Keras model.

    Returns:
        The variables, each once.
    """
    found: dict[int, keras.Variable] = {}
    for layer in _compat.flatten_layers(model, include_self=True, recursive=True):
        if layer.trainable:
            for variable in _compat.own_non_trainable_variables(layer):
                found.setdefault(id(variable), variable)
    return list(found.values())


def guard_model_state(model: keras.Model) -> keras.Model:
    """Makes a step the optimizer skips leave every model variable unchanged.

    Wraps `model.train_step` (once; idempotent). Active when the model's
    optimizer is a `tfmp.DynamicLossScaleOptimizer` and the model has forward
    state; otherwise the step runs unchanged. `tfmp.prepare` and the tfmp
    callbacks call it; call it yourself when you compile a model with
    `tfmp.wrap_optimizer` and fit it without either.

    Cost per step: one read of the guarded variables before the step and one
    select-and-assign after it (BatchNorm statistics: a few vectors).

    Args:
        model: A Keras model (any kind, subclassed included).

    Returns:
        `model` itself.

    Example:
    >>> model.compile(tfmp.wrap_optimizer("adam", "bf16", guard=True), "mse")
    >>> tfmp.guard_model_state(model)
    >>> model.fit(x_with_a_nan_batch, y)   # moving statistics stay finite
    """
    if getattr(model, _MARK, False):
        return model

    def guarded(original):
        def train_step(data: Any) -> Any:
            optimizer = getattr(model, "optimizer", None)
            state = forward_state(model)
            if not (isinstance(optimizer, DynamicLossScaleOptimizer) and state):
                return original(data)
            build_optimizer(model, optimizer)  # else Keras builds it later in this one trace
            if not optimizer.built:  # a model not built yet, or with nothing to train
                return original(data)
            before = [ops.copy(v.value) for v in state]
            skipped_before = ops.copy(optimizer.skipped_steps.value)
            logs = original(data)
            skipped = optimizer.skipped_steps > skipped_before
            for variable, value in zip(state, before):
                variable.assign(ops.where(skipped, value, variable))
            return logs

        return train_step

    _compat.wrap_step(model, "train_step", guarded)  # an already traced step is traced again
    setattr(model, _MARK, True)
    return model
