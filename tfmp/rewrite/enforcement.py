"""`enforce_float32`: a copy of a model with float32 where precision matters.

Outputs, normalization and softmax layers (and any named or given class) compute
in float32 in the copy; everything else keeps its policy. Weights are copied; the
original is untouched.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import keras

from tfmp.rewrite.classify import is_normalization, is_softmax, output_layers
from tfmp.rewrite.cloning import cast_op_outputs, clone_with_dtypes

LayerSpec = Union[str, type]


def _matches(layer: keras.layers.Layer, specs: Sequence[LayerSpec]) -> bool:
    return any(
        layer.name == s if isinstance(s, str) else isinstance(layer, s) for s in specs
    )


def float32_selector(
    model: keras.Model,
    *,
    outputs: bool = True,
    normalization: bool = True,
    softmax: bool = True,
    extra_layers: Iterable[LayerSpec] = (),
) -> Callable[[keras.layers.Layer], bool]:
    """A predicate for the layers `enforce_float32` puts in float32.

    Args:
        model: The model whose output layers count.
        outputs, normalization, softmax, extra_layers: As for `enforce_float32`.

    Returns:
        `chosen(layer) -> bool`.
    """
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


