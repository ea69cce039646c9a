"""Cloning a model with another dtype per layer: the engine behind enforce_float32,
convert_policy, prepare and export.

The original model is never modified; weights are copied to the clone.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import keras

from tfmp import _compat
from tfmp import layers as tfmp_layers
from tfmp._messages import first_line
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.classify import FLOAT32_BY_CONSTRUCTION, is_plain_model, iter_layers


class ConfigRoundTripError(ValueError):
    """A layer cannot be re-created from its own config (its `get_config` holds keys its
    `__init__` rejects, or misses some it needs): the model cannot be copied layer by layer."""


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

    Args:
        model: A built Sequential or Functional model (nested ones included).
        dtype_for: The dtype (policy name) to give each layer, or None to keep its own.
        chosen: The layers that would change, named in the error for a subclassed model.

    Returns:
        The clone.

    Raises:
        ValueError: `model` (or a nested model) is subclassed, or not built.
        ConfigRoundTripError: a layer's config does not re-create it (a `ValueError`).
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
        except (TypeError, ValueError, KeyError, NotImplementedError) as e:
            first = first_line(e)
            raise ConfigRoundTripError(
                f"layer {layer.name!r} ({type(layer).__name__}) cannot be re-created from its "
                f"config ({type(e).__name__}: {first})") from None
        finally:
            keras.config.set_dtype_policy(previous)

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


def _half_op_output(tensor: Any) -> bool:
    """A 16-bit tensor produced by a `keras.ops` call rather than a layer."""
    half = keras.backend.standardize_dtype(tensor.dtype) in HALF_DTYPES
    return half and not isinstance(_compat.producer(tensor), keras.layers.Layer)


def cast_op_outputs(model: keras.Model) -> keras.Model:
    """Ends each 16-bit output that a `keras.ops` call produces with `Float32Output`.

    A layer's dtype can be set to float32; an op's cannot (it computes in its
    inputs' dtype), so such outputs get a cast layer. Other models come back as they are.

    Args:
        model: A model.

    Returns:
        `model`, or a Functional model over the same layers with the casts added.
    """
    if isinstance(model, keras.Sequential) or not is_plain_model(model):
        return model
    if not any(_half_op_output(t) for t in keras.tree.flatten(model.outputs)):
        return model

    def cast(tensor):
        return tfmp_layers.Float32Output()(tensor) if _half_op_output(tensor) else tensor

    structure = _compat.outputs_structure(model)
    return keras.Model(model.inputs, keras.tree.map_structure(cast, structure), name=model.name)


def policy_rule(source: str, policy: str, chosen: Callable[[keras.layers.Layer], bool]
                ) -> Callable[[keras.layers.Layer], Optional[str]]:
    """The dtype each layer takes when a model built under `source` goes to `policy`.

    Layers selected by `chosen`, and tfmp's float32-by-construction layers, are
    float32; every other layer built with `source` takes `policy`; layers given
    another dtype on purpose keep theirs (None).

    Args:
        source: The policy the model was built under.
        policy: The policy to compute under.
        chosen: The layers to put in float32.

    Returns:
        `dtype_for(layer) -> policy name or None`.
    """

    def dtype_for(layer: keras.layers.Layer) -> Optional[str]:
        if chosen(layer) or isinstance(layer, FLOAT32_BY_CONSTRUCTION):
            return "float32"
        if layer.dtype_policy.name == source:
            return policy
        return None

    return dtype_for


def rebuild_under_policy(
    model: keras.Model, source: str, policy: str, chosen: Callable[[keras.layers.Layer], bool]
) -> keras.Model:
    """Clones a model built under the `source` policy so that it computes under `policy`.

    Each layer takes the dtype `policy_rule` gives it. Weights are copied (bit for
    bit: variables are float32 under every policy). Works in every direction:
    float32 -> mixed, mixed -> float32, mixed_bfloat16 -> mixed_float16.

    Args:
        model: A built Sequential or Functional model.
        source: The policy it was built under.
        policy: The policy to compute under.
        chosen: The layers to put in float32.

    Returns:
        The rebuilt model.

    Raises:
        ValueError: `model` (or a nested model) is subclassed, or not built.
        ConfigRoundTripError: a layer's config does not re-create it (a `ValueError`).
    """
    return cast_op_outputs(clone_with_dtypes(model, policy_rule(source, policy, chosen), chosen))
