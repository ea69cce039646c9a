"""Keras' layer and model internals (any backend): the model walk, variables, producers, the
Functional class, MultiHeadAttention's softmax hook."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import keras

from tfmp._compat.base import relying_on

def _tracking_decorator() -> Callable:
    with relying_on("keras.src.utils.tracking.no_automatic_dependency_tracking"):
        from keras.src.utils import tracking

        return tracking.no_automatic_dependency_tracking


# The decorator Keras puts on LossScaleOptimizer.build: variables made there are not
# tracked twice.
no_automatic_dependency_tracking = _tracking_decorator()


def flatten_layers(layer: Any, include_self: bool = False,
                   recursive: bool = True) -> list:
    """`layer._flatten_layers(...)`: its sublayers, nested models included, each once."""
    with relying_on("Layer._flatten_layers"):
        return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def own_variables(layer: Any) -> list:
    """The variables a layer itself owns (`_trainable_variables + _non_trainable_variables`),
    not those of its sublayers."""
    with relying_on("Layer._trainable_variables / Layer._non_trainable_variables"):
        return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def own_non_trainable_variables(layer: Any) -> list:
    """`layer._non_trainable_variables`: BatchNormalization's moving statistics and the like."""
    with relying_on("Layer._non_trainable_variables"):
        return list(layer._non_trainable_variables)


def recast_variable(variable: Any, dtype: str) -> Callable[[], None]:
    """Stores a built `keras.Variable` in `dtype` from now on, in place: the same object
    (its path, trainability, aggregation and owner unchanged), its value cast and a new
    backend variable made for it by Keras' own `_initialize` (`KerasVariable._dtype`,
    `_value`, `_initialize`, Keras 3.15). Traced functions that read the old backend
    variable must be traced again; so must an optimizer built on it.

    Returns:
        A function that puts the variable back as it was (its old backend variable, its
        value unchanged).
    """
    dtype = keras.backend.standardize_dtype(dtype)
    with relying_on("KerasVariable._dtype / _value / _initialize"):
        old_dtype, old_value = variable._dtype, variable._value

        def undo() -> None:
            variable._dtype, variable._value = old_dtype, old_value

        if old_dtype == dtype:
            return undo
        variable._dtype = dtype
        if old_value is not None:  # else not initialized yet: it will be made in `dtype`
            value = keras.ops.cast(keras.ops.convert_to_tensor(old_value), dtype)
            variable._value = None
            # under the strategy that made it (a MirroredVariable stays mirrored when the
            # call comes from outside `strategy.scope()`)
            strategy = getattr(old_value, "_distribute_strategy", None)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                variable._initialize(value)
    return undo


def producer(tensor: Any) -> Any:
    """The layer or operation that produced a symbolic tensor (`_keras_history.operation`)."""
    with relying_on("KerasTensor._keras_history.operation"):
        return tensor._keras_history.operation


def inbound_tensors(layer: Any) -> list:
    """The symbolic tensors a layer was called on in a Sequential or Functional graph
    (`_inbound_nodes[*].input_tensors`, every call)."""
    with relying_on("Layer._inbound_nodes / Node.input_tensors"):
        return [t for node in layer._inbound_nodes for t in keras.tree.flatten(node.input_tensors)]


def functional_class() -> type:
    """Keras' `Functional` model class (Sequential and Functional subclasses derive from it)."""
    with relying_on("keras.src.models.functional.Functional"):
        from keras.src.models.functional import Functional

        return Functional


def outputs_structure(model: Any) -> Any:
    """A Functional model's outputs in the structure it was built with (`_outputs_struct`)."""
    with relying_on("Functional._outputs_struct"):
        return model._outputs_struct


class AttentionWithOwnSoftmax(keras.layers.MultiHeadAttention):
    """A `MultiHeadAttention` whose attention probabilities always come from
    `self.attention_softmax(axis)` (a layer made once, at build time).

    Relies on two override points of Keras' MultiHeadAttention: `_build_attention`
    (where the stock `Softmax` is made) and `_compute_attention`, which takes
    the explicit path (scores materialized, `self._softmax` called) only when the
    scores are asked for and flash attention is off; otherwise the fused
    `dot_product_attention` would compute the softmax in the compute dtype.
    """

    def attention_softmax(self, axis: Any) -> keras.layers.Layer:  # pragma: no cover
        raise NotImplementedError

    def _build_attention(self, rank: int) -> None:
        with relying_on("MultiHeadAttention._build_attention / _softmax / _tracker"):
            super()._build_attention(rank)
            stock = self._softmax
            self._tracker.untrack(stock)  # the stock Softmax is no longer a sublayer
            self._softmax = self.attention_softmax(stock.axis)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        with relying_on("MultiHeadAttention._flash_attention"):
            flash, self._flash_attention = self._flash_attention, False
        try:
            return super()._compute_attention(
                query, key, value, attention_mask=attention_mask, training=training,
                return_attention_scores=True, use_causal_mask=use_causal_mask)
        finally:
            self._flash_attention = flash


# ---- calls

@contextlib.contextmanager
def calls_wrapped(layers: Iterable[Any],
                  wrapper: Callable[[Any, Callable], Callable]) -> Iterator[None]:
    """While inside, each layer's `call` is `wrapper(layer, call)`, set on the instance.

    Relies on `Operation.__call__` looking `self.call` up at every call (Keras 3.15),
    so that an instance attribute takes the place of the class's method; on exit the
    layers get back what they had (their class's method, or an instance `call` of
    their own).
    """
    previous = []
    try:
        for layer in layers:
            own = vars(layer).get("call", _NO_CALL)
            previous.append((layer, own))
            object.__setattr__(layer, "call", wrapper(layer, layer.call))
        yield
    finally:
        for layer, own in reversed(previous):
            if own is _NO_CALL:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own)


_NO_CALL = object()


def set_instance_call(layer: Any, call: Callable) -> None:
    """`layer.call = call` on this instance only (see `calls_wrapped`), untracked by Keras."""
    object.__setattr__(layer, "call", call)


def clear_losses(layer: Any) -> None:
    """`layer._clear_losses()`: drops the losses `add_loss` recorded in the last call (Keras
    clears them when a new top-level call begins; a trace leaves graph tensors there)."""
    with relying_on("Layer._clear_losses"):
        layer._clear_losses()


def remove_instance_call(layer: Any) -> None:
    """Undoes `set_instance_call`: the layer's class's `call` again."""
    if "call" in vars(layer):
        object.__delattr__(layer, "call")
