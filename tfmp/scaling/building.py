"""The optimizer built before the first step, so that Keras traces its train step once.

Without a distribution strategy, Keras 3 defers building the optimizer to the
first traced train step (`_maybe_symbolic_build` in Keras' TensorFlow trainer:
"defer building ... This maximizes backwards compatibility"). The optimizer's
variables are then created inside that trace, and TensorFlow traces a function
that created variables on its first call a second time. Building the optimizer
beforehand, on the variables Keras would give it, saves that second trace, with the
same variables and the same steps. Under a strategy Keras builds it before fit itself.

A `DynamicLossScaleOptimizer` that Keras builds inside the traced step (no callback,
no `prepare`) creates its variables out of the trace (`outside_the_trace`), so that
step is traced once too. TensorFlow-only (`tf.init_scope`, `tf.variable_creator_scope`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import keras
import tensorflow as tf


def build_optimizer(model: keras.Model,
                    optimizer: Optional[keras.optimizers.Optimizer] = None) -> bool:
    """Builds `optimizer` (default `model.optimizer`) on the model's trainable variables.

    Does what Keras does inside the first train step, once the model is built:
    `optimizer.build(model.trainable_variables)` under the model's strategy. Nothing
    happens when the optimizer is already built, or when the model is not built yet
    (a subclassed model never called: its variables do not exist yet, and Keras builds
    the optimizer in the first step as before). `tfmp.prepare` and tfmp's callbacks
    (at the start of `fit`) call it.

    Args:
        model: A Keras model.
        optimizer: The optimizer to build; defaults to `model.optimizer`.

    Returns:
        True when this call built the optimizer.

    Example:
    >>> model.compile(tfmp.wrap_optimizer("adam", "bf16"), "mse")
    >>> tfmp.scaling.build_optimizer(model)   # the first fit traces its step once
    True
    """
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.Optimizer) or optimizer.built:
        return False
    if not model.built or not model.trainable_variables:
        return False
    strategy = getattr(model, "distribute_strategy", None)  # the TensorFlow trainer's
    if strategy is None:
        optimizer.build(model.trainable_variables)
    else:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    return True


def can_build_outside_the_trace() -> bool:
    """Whether variables created now would be created by a traced function that no
    strategy scope covers: where `outside_the_trace` lifts them out.

    Returns:
        True inside a `tf.function` being traced, with no distribution strategy set.
    """
    return tf.inside_function() and not tf.distribute.has_strategy()


@contextlib.contextmanager
def outside_the_trace() -> Iterator[None]:
    """Variables created in this block are created eagerly, not by the function being traced.

    Keras builds an optimizer inside the first traced train step when no strategy is
    set, and TensorFlow traces a function that created variables on its first call a
    second time. Created under `tf.init_scope()`, and past `tf.function`'s own variable
    creator (which records them for that second trace), they exist before the trace goes
    on, with the initial values they would have had, and the first trace is the only one.
    Elsewhere (`can_build_outside_the_trace` false) the block runs as it is.

    Example:
    >>> with outside_the_trace():
    ...     optimizer.build(variables)   # in a step being traced: eager variables
    """
    if can_build_outside_the_trace():
        with tf.init_scope(), tf.variable_creator_scope(_not_lifted):
            yield
    else:
        yield


def _not_lifted(next_creator: Any, **kwargs: Any) -> tf.Variable:
    # Stacked last, so called first: `tf.function`'s creator below it then passes the
    # variable on (`experimental_enable_variable_lifting=False`) instead of recording it,
    # and under `tf.init_scope` it is an eager variable.
    return next_creator(**{**kwargs, "experimental_enable_variable_lifting": False})
