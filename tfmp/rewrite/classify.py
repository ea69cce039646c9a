"""What a layer is, as far as precision goes: normalization, softmax, an output, float32 by construction.

The model walk every other part of `tfmp.rewrite` uses (`iter_layers`,
`output_layers`) and the policy a model was built with (`model_policy`).
"""

from __future__ import annotations

import collections
from typing import Iterator

import keras

from tfmp import _compat
from tfmp import layers as tfmp_layers
from tfmp.precision.ranges import HALF_DTYPES

KNOWN_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "float16", "bfloat16")
NORMALIZATION_LAYERS: tuple[type, ...] = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
    keras.layers.RMSNormalization,
)
# Layers whose own code upcasts half inputs to float32 before normalizing
# (Keras 3.15 source; tfmp.layers.StableLayerNorm by construction).
UPCASTING_NORMALIZATION: tuple[type, ...] = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
)
FLOAT32_BY_CONSTRUCTION: tuple[type, ...] = (
    tfmp_layers.Float32Output,
    tfmp_layers.StableSoftmax,
    tfmp_layers.Float32Dense,
)


def is_normalization(layer: keras.layers.Layer) -> bool:
    """True for Keras normalization layers and classes named `*Normalization` / `*Norm`.

    Args:
        layer: A Keras layer or model.

    Returns:
        Whether it is a normalization layer.
    """
    name = type(layer).__name__
    return isinstance(layer, NORMALIZATION_LAYERS) or name.endswith(("Normalization", "Norm"))


def is_softmax(layer: keras.layers.Layer) -> bool:
    """True for `Softmax` layers and layers whose `activation` is (log_)softmax.

    Args:
        layer: A Keras layer or model.

    Returns:
        Whether it is a softmax.
    """
    if isinstance(layer, tfmp_layers.StableSoftmax):
        return False
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") in ("softmax", "log_softmax")


def is_plain_model(layer: keras.layers.Layer) -> bool:
    """True for Sequential and Functional models (the ones Keras can clone).

    Args:
        layer: A Keras layer or model.

    Returns:
        Whether it is a Sequential or Functional model.
    """
    return isinstance(layer, (keras.Sequential, _compat.functional_class()))


def iter_layers(
    layer: keras.layers.Layer, prefix: str = ""
) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yields `(path, layer)` for every sublayer, depth first, nested models included.

    Args:
        layer: A model or layer.
        prefix: Prepended to every path (`"outer/"` for the layers of a nested model).

    Yields:
        `(path, layer)`, input layers left out.
    """
    for sub in _compat.flatten_layers(layer, include_self=False, recursive=False):
        if isinstance(sub, keras.layers.InputLayer):
            continue
        path = f"{prefix}{sub.name}"
        yield path, sub
        yield from iter_layers(sub, path + "/")


def output_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The non-model layers that produce `model`'s outputs (through nested models).

    Args:
        model: A Keras model (a subclassed one has none that can be read).

    Returns:
        The layers, each once.
    """
    found: list[keras.layers.Layer] = []
    if isinstance(model, keras.Sequential):
        last = model.layers[-1] if model.layers else None
        candidates = [last] if last is not None else []
    elif is_plain_model(model):
        candidates = [_compat.producer(t) for t in keras.tree.flatten(model.outputs)]
    else:
        return found
    for layer in candidates:
        if is_plain_model(layer):
            found.extend(output_layers(layer))
        elif layer not in found:
            found.append(layer)
    return found


KEPT_FLOAT32 = "_tfmp_float32_layers"  # on a prepared model: {path: why} of float32_layers


def kept_float32(model: keras.Model) -> dict[str, str]:
    """The layers `tfmp.prepare(..., float32_layers=...)` kept in float32: `{path: why}`
    (empty for a model `prepare` did not make, or a reloaded one).

    Args:
        model: A Keras model.

    Returns:
        `{path: why}`.
    """
    return dict(vars(model).get(KEPT_FLOAT32, {}))


def expected_to_differ(layer: keras.layers.Layer, outputs: set[int]) -> bool:
    """Layers expected to compute in another policy than the model's (float32 on purpose).

    Args:
        layer: The layer.
        outputs: `id()`s of the model's output layers.
    """
    return (is_softmax(layer) or is_normalization(layer) or id(layer) in outputs
            or isinstance(layer, FLOAT32_BY_CONSTRUCTION) or isinstance(layer, keras.Model))


def model_policy(model: keras.Model) -> str:
    """The policy most of the model's ordinary layers were built with.

    A subclassed model's own policy (Keras gives it the global one when it is built,
    and tfmp's conversions set it), since its output layers cannot be told apart by
    reading it.

    Args:
        model: A Keras model.

    Returns:
        A dtype policy name (`float32` for a model without ordinary layers).
    """
    if not is_plain_model(model) and model.dtype_policy.name in KNOWN_POLICIES:
        return model.dtype_policy.name
    outputs = {id(l) for l in output_layers(model)}
    names = collections.Counter(
        layer.dtype_policy.name for _, layer in iter_layers(model)
        if not expected_to_differ(layer, outputs)
    )
    return names.most_common(1)[0][0] if names else "float32"
