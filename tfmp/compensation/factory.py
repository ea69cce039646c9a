"""`tfmp.compensate`: a Keras optimizer made a `CompensatedOptimizer` (its class, made once
per optimizer class and registered for `.keras` loading)."""

from __future__ import annotations

from typing import Optional, Union

import keras

from tfmp.compensation.optimizer import (DEFAULT_LOST_UPDATES_EVERY, DEFAULT_ROUNDING,
                                         DEFAULT_SLOTS_DTYPE, CompensatedOptimizer, checked_seed)

_CLASSES: dict[type, type] = {}


def compensated_class(base: type) -> type:
    """The compensated subclass of a Keras optimizer class (made once, registered for
    `.keras` loading as `tfmp>Compensated<Name>`).

    Args:
        base: A `keras.optimizers.Optimizer` subclass.

    Returns:
        `base` itself if it is compensated already, else `Compensated<base>`.
    """
    if issubclass(base, CompensatedOptimizer):
        return base
    if base not in _CLASSES:
        name = f"Compensated{base.__name__}"
        cls = type(name, (CompensatedOptimizer, base), {
            "__module__": CompensatedOptimizer.__module__,
            "__doc__": f"`{base.__name__}` for 16-bit weights (see `CompensatedOptimizer`).",
        })
        _CLASSES[base] = keras.saving.register_keras_serializable(package="tfmp", name=name)(cls)
    return _CLASSES[base]


for _base in (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW,
              keras.optimizers.RMSprop, keras.optimizers.Adagrad, keras.optimizers.Adamax,
              keras.optimizers.Nadam, keras.optimizers.Lion, keras.optimizers.Adadelta):
    compensated_class(_base)  # loadable from a .keras file before any compensate() call


def compensate(optimizer: Union[str, keras.optimizers.Optimizer], *,
               rounding: str = DEFAULT_ROUNDING, slots_dtype: str = DEFAULT_SLOTS_DTYPE,
               lost_updates_every: int = DEFAULT_LOST_UPDATES_EVERY,
               seed: Optional[int] = None) -> keras.optimizers.Optimizer:
    """Makes `optimizer` keep the small updates of 16-bit weights (in place).

    Args:
        optimizer: A Keras optimizer or its name, not built yet; a loss-scale optimizer's
            inner optimizer is compensated.
        rounding, slots_dtype, lost_updates_every, seed: See `CompensatedOptimizer`.

    Returns:
        The optimizer given (its class now `Compensated<Class>`, a subclass of its own).

    Raises:
        ValueError: an option out of range; an optimizer already built or already
            compensated; not a Keras optimizer.

    Example:
    >>> keras.config.set_dtype_policy("bfloat16")  # bfloat16 weights and slots
    >>> opt = tfmp.compensate(keras.optimizers.Adam(1e-4))
    >>> model.compile(opt, "sparse_categorical_crossentropy")
    """
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    target = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(target, keras.optimizers.Optimizer):
        raise ValueError(f"compensate() takes a Keras optimizer; got {optimizer!r}")
    if isinstance(target, CompensatedOptimizer):
        raise ValueError(f"{type(target).__name__} is compensated already "
                         f"(rounding={target.rounding!r})")
    if target.built or getattr(optimizer, "built", False):
        raise ValueError(f"{type(target).__name__} is built already: compensate it before "
                         "its first step (its slots are created in its dtype choice)")
    cls = compensated_class(type(target))
    seed = checked_seed(rounding, slots_dtype, lost_updates_every, seed)  # before any change
    target.__class__ = cls
    target.init_compensation(rounding, slots_dtype, lost_updates_every, seed)
    return optimizer
