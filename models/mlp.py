"""A dense classifier (multi-layer perceptron)."""

from typing import Optional, Sequence

import keras

from tfmp import layers as tfmp_layers

# `--size=large` (tools/bench): hidden 1024, wide enough for 16-bit matmul units to pay.
LARGE = dict(hidden=(1024, 1024))
INPUT_KIND = "vector"


def build(
    input_shape: Sequence[int] = (64,),
    num_classes: int = 10,
    vocab_size: Optional[int] = None,
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
) -> keras.Model:
    """Builds an MLP that returns float32 logits.

    Args:
        input_shape: Shape of one example; anything but a vector is flattened.
        num_classes: Number of output logits.
        vocab_size: Unused (uniform builder signature).
        hidden: Units of each hidden layer (multiples of 8 suit Tensor Cores).
        dropout: Dropout rate after each hidden layer.
    """
    del vocab_size
    inputs = keras.Input(tuple(input_shape), name="features")
    x = keras.layers.Flatten()(inputs) if len(input_shape) > 1 else inputs
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    outputs = tfmp_layers.Float32Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")
