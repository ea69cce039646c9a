"""Cloning a model with float32 where precision matters: `enforce_float32`.

Also the float32 -> mixed conversion `tfmp.prepare` uses (`rebuild_under_policy`).
The original model is never modified; weights are copied to the clone.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import keras

from tfmp import layers as tfmp_layers

HALF_DTYPES = ("float16", "bfloat16")
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

LayerSpec = Union[str, type]


def is_normalization(layer: keras.layers.Layer) -> bool:
    """True for Keras normalization layers and classes named `*Normalization` / `*Norm`."""
    name = type(layer).__name__
    return isinstance(layer, NORMALIZATION_LAYERS) or name.endswith(("Normalization", "Norm"))


def is_softmax(layer: keras.layers.Layer) -> bool:
    """True for `Softmax` layers and layers whose `activation` is (log_)softmax."""
    if isinstance(layer, tfmp_layers.StableSoftmax):
        return False
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") in ("softmax", "log_softmax")


def is_plain_model(layer: keras.layers.Layer) -> bool:
    """True for Sequential and Functional models (the ones Keras can clone)."""
    return isinstance(layer, (keras.Sequential, keras.src.models.functional.Functional))


def iter_layers(
    layer: keras.layers.Layer, prefix: str = ""
) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yields `(path, layer)` for every sublayer, depth first, nested models included."""
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        if isinstance(sub, keras.layers.InputLayer):
            continue
        path = f"{prefix}{sub.name}"
        yield path, sub
        yield from iter_layers(sub, path + "/")


def output_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The non-model layers that produce `model`'s outputs (through nested models)."""
    found: list[keras.layers.Layer] = []
    if isinstance(model, keras.Sequential):
        last = model.layers[-1] if model.layers else None
        candidates = [last] if last is not None else []
    elif is_plain_model(model):
        candidates = [t._keras_history.operation for t in keras.tree.flatten(model.outputs)]
    else:
        return found
    for layer in candidates:
        if is_plain_model(layer):
            found.extend(output_layers(layer))
        elif layer not in found:
            found.append(layer)
    return found


def _matches(layer: keras.layers.Layer, specs: Sequence[LayerSpec]) -> bool:
    return any(
        layer.name == s if isinstance(s, str) else isinstance(layer, s) for s in specs
    )


def _needs_clone_error(model: keras.Model, chosen: Callable[[keras.layers.Layer], bool]) -> ValueError:
    names = [path for path, layer in iter_layers(model) if chosen(layer)]
    return ValueError(
        f"Cannot clone {type(model).__name__!r}: it is a subclassed model, which Keras "
        f"cannot clone layer by layer. Layers that would be changed to float32: "
        f"{', '.join(names) or 'none found'}. Build them with tfmp.layers "
        "(StableLayerNorm, StableSoftmax, Float32Dense, Float32Output) or dtype='float32'."
    )


def clone_with_dtypes(
    model: keras.Model,
    dtype_for: Callable[[keras.layers.Layer], Optional[str]],
    chosen: Callable[[keras.layers.Layer], bool],
) -> keras.Model:
    """Clones `model`, giving each layer `dtype_for(layer)` (None: unchanged).

    Weights are copied; the original is untouched.

    Raises:
        ValueError: `model` (or a nested model) is subclassed, or not built.
    """
    if not is_plain_model(model):
        raise _needs_clone_error(model, chosen)
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on data or give it an Input first."
        )

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        if not isinstance(layer, keras.layers.Layer):
            # A `keras.ops` call recorded in a functional graph (`Add`, `Multiply`,
            # ...): stateless, it computes in its inputs' dtype. Reused as it is.
            return layer
        if isinstance(layer, keras.Model):  # a plain model is recursed into by Keras
            raise _needs_clone_error(layer, chosen)
        config = layer.get_config()
        dtype = dtype_for(layer)
        if dtype is not None:
            config["dtype"] = dtype
        # Sublayers a custom layer creates in `__init__` without a dtype take the
        # global policy: make it the layer's own while the layer is made.
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(dtype or layer.dtype_policy)
        try:
            return type(layer).from_config(config)
        finally:
            keras.config.set_dtype_policy(previous)

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


def _half_op_output(tensor: Any) -> bool:
    """A 16-bit tensor produced by a `keras.ops` call rather than a layer."""
    half = keras.backend.standardize_dtype(tensor.dtype) in HALF_DTYPES
    return half and not isinstance(tensor._keras_history.operation, keras.layers.Layer)


def cast_op_outputs(model: keras.Model) -> keras.Model:
    """Ends each 16-bit output that a `keras.ops` call produces with `Float32Output`.

    A layer's dtype can be set to float32; an op's cannot (it computes in its
    inputs' dtype), so such outputs get a cast layer. Other models come back as they are.
    """
    if isinstance(model, keras.Sequential) or not is_plain_model(model):
        return model
    if not any(_half_op_output(t) for t in keras.tree.flatten(model.outputs)):
        return model

    def cast(tensor):
        return tfmp_layers.Float32Output()(tensor) if _half_op_output(tensor) else tensor

    structure = getattr(model, "_outputs_struct", model.outputs)
    return keras.Model(model.inputs, keras.tree.map_structure(cast, structure), name=model.name)


def float32_selector(
    model: keras.Model,
    *,
    outputs: bool = True,
    normalization: bool = True,
    softmax: bool = True,
    extra_layers: Iterable[LayerSpec] = (),
) -> Callable[[keras.layers.Layer], bool]:
    """A predicate for the layers `enforce_float32` puts in float32."""
    out_ids = {id(layer) for layer in output_layers(model)} if outputs else set()
    extra = tuple(extra_layers)

    def chosen(layer: keras.layers.Layer) -> bool:
        return (
            id(layer) in out_ids
            or (normalization and is_normalization(layer))
            or (softmax and is_softmax(layer))
            or _matches(layer, extra)
        )

    return chosen


def enforce_float32(
    model: keras.Model,
    *,
    outputs: bool = True,
    normalization: bool = True,
    softmax: bool = True,
    extra_layers: Iterable[LayerSpec] = (),
) -> keras.Model:
    """Returns a copy of `model` whose sensitive layers compute in float32.

    Args:
        model: A built Sequential or Functional model (nested ones included).
        outputs: Make the layers producing the model's outputs float32, so
            every output is float32.
        normalization: Make normalization layers float32.
        softmax: Make softmax layers (and layers with a softmax activation) float32.
        extra_layers: More layers to make float32, by name or class.

    Returns:
        A new model with the original weights; the original is not modified.

    Raises:
        ValueError: `model` is subclassed (the message names the layers that
            would change and points at `tfmp.layers`) or not built.

    Example:
    >>> fixed = tfmp.enforce_float32(model)
    >>> fixed.outputs[0].dtype
    'float32'
    """
    chosen = float32_selector(
        model, outputs=outputs, normalization=normalization, softmax=softmax,
        extra_layers=extra_layers,
    )
    clone = clone_with_dtypes(model, lambda l: "float32" if chosen(l) else None, chosen)
    return cast_op_outputs(clone) if outputs else clone


def rebuild_under_policy(
    model: keras.Model, source: str, policy: str, chosen: Callable[[keras.layers.Layer], bool]
) -> keras.Model:
    """Clones a model built under the `source` policy so that it computes under `policy`.

    Layers selected by `chosen`, and tfmp's float32-by-construction layers,
    are float32; every other layer built with `source` takes `policy`; layers
    given another dtype on purpose keep it. Weights are copied (bit for bit:
    variables are float32 under every policy). Works in every direction:
    float32 -> mixed, mixed -> float32, mixed_bfloat16 -> mixed_float16.
    """

    def dtype_for(layer: keras.layers.Layer) -> Optional[str]:
        if chosen(layer) or isinstance(layer, FLOAT32_BY_CONSTRUCTION):
            return "float32"
        if layer.dtype_policy.name == source:
            return policy
        return None

    return cast_op_outputs(clone_with_dtypes(model, dtype_for, chosen))
