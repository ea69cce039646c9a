"""`tfmp.compensate`: a Keras optimizer made a `CompensatedOptimizer` (its class, made once
per optimizer class and registered for `.keras` loading)."""

from __future__ import annotations

from typing import Optional, Union

import keras

from tfmp import _compat
from tfmp.compensation.optimizer import (DEFAULT_LOST_UPDATES_EVERY, DEFAULT_ROUNDING,
                                         DEFAULT_SLOTS_DTYPE, OPTIONS, CompensatedOptimizer,
                                         checked_seed)

_CLASSES: dict[type, type] = {}


def compensated_class(base: type) -> type:
    """The compensated subclass of a Keras optimizer class (made once, registered for
    `.keras` loading as `tfmp>Compensated<Name>`). Keras' own classes are made when tfmp is
    imported; a class of your own is made by `compensate()`, or call this before
    `keras.models.load_model` in a new process.

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


for _base in vars(keras.optimizers).values():  # Keras' own: loadable before any compensate()
    if (isinstance(_base, type) and issubclass(_base, keras.optimizers.Optimizer)
            and _base is not keras.optimizers.Optimizer
            and not issubclass(_base, keras.optimizers.LossScaleOptimizer)):
        compensated_class(_base)


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
            compensated; not a Keras optimizer; weight decay by a class that applies it its
            own way (overrides Keras' `_apply_weight_decay`, as Muon does).

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
    if target.weight_decay is not None and _compat.applies_own_weight_decay(target):
        raise ValueError(f"{type(target).__name__} applies its weight decay its own way, which "
                         "compensate() cannot fold into the 16-bit write; pass weight_decay=None "
                         "(decay in the loss instead) or use AdamW")
    if target.built or getattr(optimizer, "built", False):
        raise ValueError(f"{type(target).__name__} is built already: compensate it before "
                         "its first step (its slots are created in its dtype choice)")
    cls = compensated_class(type(target))
    seed = checked_seed(rounding, slots_dtype, lost_updates_every, seed)  # before any change
    target.__class__ = cls
    target.init_compensation(rounding, slots_dtype, lost_updates_every, seed)
    return optimizer


def plain_copy(optimizer: keras.optimizers.Optimizer,
               **overrides: object) -> keras.optimizers.Optimizer:
    """A new, unbuilt optimizer of the class `optimizer` compensates (its own class if it is
    not compensated), with its settings but not the compensation's.

    Args:
        optimizer: A Keras optimizer, compensated or not.
        **overrides: Settings that replace its own (`learning_rate=...`).

    Returns:
        The copy (`from_config` of the plain class; a learning-rate schedule is shared, not
        serialized, so a schedule of the user's own need not be registered).

    Raises:
        Exception: what the class's `from_config` raises on its own config.
    """
    cls = next(c for c in type(optimizer).__mro__ if issubclass(c, keras.optimizers.Optimizer)
               and not issubclass(c, CompensatedOptimizer))
    config = {k: v for k, v in optimizer.get_config().items() if k not in OPTIONS}
    schedule = _compat.learning_rate_schedule(optimizer)
    if schedule is not None:
        config["learning_rate"] = schedule
    return cls.from_config({**config, **overrides})
