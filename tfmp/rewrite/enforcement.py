"""`enforce_float32`: float32 where precision matters.

Outputs, normalization and softmax layers (and any named or given class) compute
in float32; everything else keeps its policy. A model Keras can rebuild layer by
layer is copied (weights copied, the original untouched); any other model is
changed in place (`tfmp.rewrite.inplace`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import keras
from absl import logging

from tfmp import _compat
from tfmp.rewrite.classify import (FLOAT32_BY_CONSTRUCTION, is_normalization, is_plain_model,
                                   is_softmax, iter_layers, output_layers)
from tfmp.rewrite.cloning import ConfigRoundTripError, cast_op_outputs, clone_with_dtypes
from tfmp.rewrite.inplace import convert_in_place, is_copyable
from tfmp.rewrite.tracing import ModelRun

LayerSpec = Union[str, type]


def layer_matcher(model: keras.Model, specs: Iterable[LayerSpec], *,
                  check: bool = True) -> Callable[[keras.layers.Layer], bool]:
    """A predicate for the layers `specs` name: a class, or a string that is a layer's
    name, its path in `model` (`outer/inner`, as `tfmp.rewrite.classify.iter_layers` and
    `tfmp.locate_overflows` give it) or its Keras `layer.path`.

    Args:
        model: The model the paths are in.
        specs: Classes, names or paths.
        check: Refuse a spec that is not a class or a string, or names no layer.

    Returns:
        `matches(layer) -> bool`.

    Raises:
        ValueError: with `check`, a spec that is neither a class nor a non-empty string,
            or a string that matches no layer of `model` (the message names it and a few
            layer paths).
    """
    specs = list(specs)
    layers = list(iter_layers(model))
    strings = set()
    for spec in specs:
        if isinstance(spec, type):
            continue
        if not check:
            strings.add(spec)
            continue
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"float32_layers entries must be layer names, paths or classes; "
                             f"got {spec!r}")
        if not any(spec in (path, layer.name, getattr(layer, "path", None))
                   for path, layer in layers):
            shown = ", ".join(path for path, _ in layers[:8]) + (" ..." if len(layers) > 8 else "")
            raise ValueError(f"float32_layers: no layer of {model.name!r} is named {spec!r}; "
                             f"its layers: {shown}")
        strings.add(spec)
    classes = tuple(spec for spec in specs if isinstance(spec, type))
    paths = {id(layer): path for path, layer in layers}

    def matches(layer: keras.layers.Layer) -> bool:
        return (isinstance(layer, classes) if classes else False) or bool(
            strings & {paths.get(id(layer)), layer.name, getattr(layer, "path", None)})

    return matches


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
    extra = layer_matcher(model, extra_layers, check=False)

    def chosen(layer: keras.layers.Layer) -> bool:
        return (
            id(layer) in out_ids
            or (normalization and is_normalization(layer))
            or (softmax and is_softmax(layer))
            or extra(layer)
        )

    return chosen


def normalizations_feeding(model: keras.Model,
                           chosen: Callable[[keras.layers.Layer], bool]) -> set[int]:
    """The normalization layers whose outputs go straight into a layer `chosen` for float32
    (an output layer, a softmax), in a Sequential or Functional graph (nested ones too).

    Their outputs stay float32: rounding them to 16 bits first would lose what the float32
    layer is there to keep. (A subclassed model's graph cannot be read: none.)

    Args:
        model: A Keras model.
        chosen: The layers that compute in float32 on purpose.

    Returns:
        `id()`s of those normalization layers.
    """
    found: set[int] = set()
    for _, layer in iter_layers(model) if is_plain_model(model) else ():
        if not (chosen(layer) or isinstance(layer, FLOAT32_BY_CONSTRUCTION)):
            continue
        for tensor in _compat.inbound_tensors(layer):
            producer = _compat.producer(tensor)
            for source in output_layers(producer) if is_plain_model(producer) else [producer]:
                if is_normalization(source):
                    found.add(id(source))
    return found


def enforce_float32(
    model: keras.Model,
    *,
    outputs: bool = True,
    normalization: bool = True,
    softmax: bool = True,
    extra_layers: Iterable[LayerSpec] = (),
    data: Any = None,
) -> keras.Model:
    """Returns `model` with its sensitive layers computing in float32.

    Sequential and Functional models of Keras' own classes are copied (weights
    copied, the original untouched). Subclassed models, Functional subclasses
    (keras-hub tasks) and models with a layer whose config does not re-create it
    are changed in place and returned themselves (`tfmp.rewrite.inplace`).

    Args:
        model: A built Keras model of any kind.
        outputs: Make every model output float32 (the layers that produce them, and
            a cast for an output that an op produces).
        normalization: Make normalization layers float32.
        softmax: Make softmax layers (and layers with a softmax activation) float32.
        extra_layers: More layers to make float32, by name, path or class.
        data: A batch to run a model changed in place on (`tfmp.rewrite.tracing.example_inputs`):
            needed for a subclassed model built from inputs of another kind than float32
            arrays; default: its input shapes.

    Returns:
        The copy, or `model` itself changed in place.

    Raises:
        ValueError: `model` is not built (or, changed in place, has no input shape to
            run it on).

    Example:
    >>> fixed = tfmp.enforce_float32(model)
    >>> fixed.outputs[0].dtype
    'float32'
    """
    chosen = float32_selector(
        model, outputs=outputs, normalization=normalization, softmax=softmax,
        extra_layers=extra_layers,
    )

    return convert(model, lambda layer: None, chosen, outputs=outputs, data=data)[0]


def convert(model: keras.Model, dtype_for: Callable[[keras.layers.Layer], Optional[str]],
            chosen: Callable[[keras.layers.Layer], bool], *, outputs: bool = True,
            data: Any = None) -> tuple[keras.Model, Optional[ModelRun]]:
    """Gives each layer `dtype_for(layer)` and the `chosen` ones float32: on a copy when
    Keras can rebuild the model layer by layer, else in place (`convert_in_place`: float32
    only for the layers the model calls itself, and only if its code runs with them).
    With `outputs`, every output is made float32.

    Args:
        model: A built Keras model.
        dtype_for: The policy for each layer, or None to keep its own.
        chosen: The layers to make float32.
        outputs: Make every output float32.
        data: In place: a batch to run the model on (default: its input shapes).

    Returns:
        `(the copy, None)`, or `(model itself, its ModelRun after the change)`.

    Raises:
        ValueError: `model` is not built, or (in place) cannot be run.
    """
    if is_copyable(model):
        def with_chosen(layer: keras.layers.Layer) -> Optional[str]:
            return "float32" if chosen(layer) else dtype_for(layer)

        try:
            clone = clone_with_dtypes(model, with_chosen, chosen)
            return (cast_op_outputs(clone) if outputs else clone), None
        except ConfigRoundTripError as e:
            logging.info("tfmp: %s; %r is converted in place instead of copied", e, model.name)
    changes, run = convert_in_place(model, dtype_for, chosen, outputs=outputs, data=data)
    for change in changes:
        logging.info("tfmp: in place: %s", change)
    return model, run
