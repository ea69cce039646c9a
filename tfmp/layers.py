"""Layers that keep the numerically sensitive parts of a model in float32.

Use them when writing a model (subclassed models in particular, which
`tfmp.enforce_float32` cannot clone); they are registered Keras serializables,
so `.keras` files that use them load after `import tfmp`.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
from keras import ops

from tfmp import _compat

__all__ = ["Float32Dense", "Float32Output", "StableLayerNorm", "StableMultiHeadAttention",
           "StableSoftmax"]

_PACKAGE = "tfmp"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StableLayerNorm(keras.layers.LayerNormalization):
    """Layer normalization computed in float32, returned in the compute dtype.

    Same arguments as `keras.layers.LayerNormalization`. Under mixed precision
    the input is upcast to float32, normalized with the float32 `gamma` and
    `beta`, and the result cast back to the layer's compute dtype, so the next
    layer keeps running in 16 bits.

    Args:
        **kwargs: `keras.layers.LayerNormalization`'s arguments.

    Example:
    >>> x = tfmp.layers.StableLayerNorm()(x)   # inside a bf16 / fp16 model
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.autocast = False  # inputs reach call() in their own dtype

    def call(self, inputs):
        outputs = ops.layer_normalization(
            ops.cast(inputs, "float32"),
            self.gamma,
            self.beta,
            self.axis,
            self.epsilon,
            rms_scaling=self.rms_scaling,
        )
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Float32Output(keras.layers.Layer):
    """A linear float32 activation to end a model with: casts its input to float32.

    Any `dtype` argument is ignored: the layer is float32 by construction.

    Args:
        **kwargs: Base `Layer` arguments (`name`, ...).

    Example:
    >>> logits = keras.layers.Dense(10)(x)           # computes in the policy's dtype
    >>> outputs = tfmp.layers.Float32Output()(logits)  # float32 for the loss
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return ops.cast(inputs, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StableSoftmax(keras.layers.Layer):
    """Softmax computed in float32.

    Args:
        axis: Axis to normalize over.
        output_dtype: dtype of the result; `None` (default) returns float32,
            which is what a model output needs; pass the compute dtype (e.g.
            `"bfloat16"`) for attention probabilities inside a model.
        **kwargs: Base `Layer` arguments.

    Example:
    >>> probs = tfmp.layers.StableSoftmax()(logits)  # float32 probabilities
    """

    def __init__(self, axis: int = -1, output_dtype: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = axis
        self.output_dtype = output_dtype
        self.supports_masking = True
        self.autocast = False

    def call(self, inputs, mask=None):
        x = ops.cast(inputs, "float32")
        if mask is not None:
            x = ops.where(ops.cast(mask, "bool"), x, ops.full_like(x, -1e9))
        axis = self.axis
        if isinstance(axis, (tuple, list)):
            axis = tuple(axis)
            probs = ops.exp(x - ops.logsumexp(x, axis=axis, keepdims=True))
        else:
            probs = ops.softmax(x, axis=axis)
        return ops.cast(probs, self.output_dtype or "float32")

    def compute_output_spec(self, inputs, mask=None):
        return keras.KerasTensor(inputs.shape, dtype=self.output_dtype or "float32")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis, "output_dtype": self.output_dtype}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StableMultiHeadAttention(_compat.AttentionWithOwnSoftmax):
    """`MultiHeadAttention` whose attention softmax is computed in float32.

    Same arguments as `keras.layers.MultiHeadAttention` (flash attention is not
    used: the scores are materialized so their softmax can run in float32).
    Projections stay in the compute dtype.

    Example:
    >>> attention = tfmp.layers.StableMultiHeadAttention(num_heads=4, key_dim=16)
    >>> y = attention(x, x)   # inside a bf16 / fp16 model
    """

    def attention_softmax(self, axis) -> keras.layers.Layer:
        """The float32 softmax the attention probabilities come from (in the compute dtype)."""
        return StableSoftmax(axis=axis, output_dtype=self.compute_dtype, name="stable_softmax")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Float32Dense(keras.layers.Dense):
    """A `Dense` layer that always computes in float32: the output head of a model.

    Same arguments as `keras.layers.Dense`; any `dtype` argument is ignored.

    Args:
        units: Output size.
        **kwargs: `keras.layers.Dense`'s other arguments.
    """

    def __init__(self, units: int, **kwargs: Any) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(units, **kwargs)
