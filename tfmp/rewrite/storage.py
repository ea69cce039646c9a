"""Where a prepared model keeps its weights: `tfmp.prepare(..., weights_dtype=...)`.

A layer that computes in 16 bits stores its trainable weights in that dtype and takes
the 16-bit policy (`"bfloat16"`: no autocast, and a `.keras` file re-creates its
variables so); every other variable is float32: the layers that compute in float32
(outputs, softmax, `float32_layers`), normalization layers (their scale and offset feed
float32 statistics), non-trainable variables (BatchNormalization's moving statistics)
and every variable of a layer that has one of those. `restore_storage` gives a model
back as it came (its very variables).
"""

from __future__ import annotations

from typing import Any, Callable

import keras

from tfmp import _compat
from tfmp.rewrite.classify import is_normalization

Changes = list[Callable[[], None]]  # each puts one variable back as it was


def _dtype(variable: Any) -> str:
    return keras.backend.standardize_dtype(variable.dtype)


def _float(variable: Any) -> bool:
    return keras.backend.is_float_dtype(_dtype(variable))


def _stored_in_half(layer: keras.layers.Layer, dtype: str, trainable: list,
                    frozen: list) -> bool:
    return (layer.compute_dtype == dtype and not is_normalization(layer)
            and any(_float(v) for v in trainable) and not any(_float(v) for v in frozen))


def store_weights(model: keras.Model, dtype: str) -> Changes:
    """Stores the trainable weights of `model`'s 16-bit layers in `dtype`, every other float
    variable in float32, in place (see the module's docstring).

    Args:
        model: A built model, converted to a policy that computes in `dtype`.
        dtype: `"bfloat16"` or `"float16"`.

    Returns:
        What puts each variable changed back (for `restore_storage`).
    """
    changes: Changes = []
    seen: set[int] = set()
    for layer in _compat.flatten_layers(model, include_self=True, recursive=True):
        frozen = _compat.own_non_trainable_variables(layer)
        trainable = [v for v in _compat.own_variables(layer) if all(v is not f for f in frozen)]
        half = _stored_in_half(layer, dtype, trainable, frozen)
        for variable in trainable + frozen:
            wanted = dtype if half and any(variable is t for t in trainable) else "float32"
            if id(variable) in seen or not _float(variable) or _dtype(variable) == wanted:
                continue
            seen.add(id(variable))
            changes.append(_compat.recast_variable(variable, wanted))
        if half:
            layer.dtype_policy = dtype
        if isinstance(layer, keras.Model):
            _compat.forget_traced_functions(layer)
    return changes


def restore_storage(changes: Changes) -> None:
    """Puts back each variable `store_weights` changed, its value and dtype as they were (the
    layers' policies are `tfmp.rewrite.inplace.restore_policies`'s).

    Args:
        changes: What `store_weights` returned.
    """
    for undo in reversed(changes):
        undo()
