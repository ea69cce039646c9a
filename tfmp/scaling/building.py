"""The optimizer built before the first step, so that Keras traces its train step once.

Without a distribution strategy, Keras 3 defers building the optimizer to the
first traced train step (`_maybe_symbolic_build` in Keras' TensorFlow trainer:
"defer building ... This maximizes backwards compatibility"). The optimizer's
variables are then created inside that trace, and TensorFlow traces a function
that created variables on its first call a second time. Building the optimizer
beforehand, on the variables Keras would give it, saves that second trace, with the
same variables and the same steps (on this project's test suite: 461 s of CPU time in
its in-process tests before, 383 s after). Under a strategy Keras builds it before fit itself.
"""

from __future__ import annotations

from typing import Optional

import keras


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
