"""A small ResNet-style image classifier with BatchNormalization (32x32 images)."""

from typing import Optional, Sequence

import keras

from tfmp import layers as tfmp_layers

# `--size=large` (tools/bench): width 64, wide enough for 16-bit matmul units to pay.
LARGE = dict(width=64)
INPUT_KIND = "image"
# Keras' default 0.99 leaves the moving statistics far from the batch statistics after a
# few hundred steps (a 3-epoch synthetic run evaluated at chance: 0.27 vs 1.0 in training,
# stock Keras float32 alike); 0.9 settles in ~50 steps.
BN_MOMENTUM = 0.9


def _conv_bn(x, filters: int, strides: int = 1, activation: bool = True, name: str = ""):
    x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if activation else x


def _residual(x, filters: int, strides: int, name: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                       name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM,
                                                    name=f"{name}_proj_bn")(shortcut)
    x = _conv_bn(x, filters, strides, name=f"{name}_a")
    x = _conv_bn(x, filters, activation=False, name=f"{name}_b")
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add()([x, shortcut]))


def build(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    vocab_size: Optional[int] = None,
    width: int = 32,
    stages: int = 2,
) -> keras.Model:
    """Builds a ResNet-style CNN that returns float32 logits.

    Args:
        input_shape: `(height, width, channels)`, float32 in [0, 1].
        num_classes: Number of output logits.
        vocab_size: Unused (uniform builder signature).
        width: Filters of the first stage; each further stage doubles them.
        stages: Residual stages (each halves the resolution after the first).
    """
    del vocab_size
    inputs = keras.Input(tuple(input_shape), name="image")
    x = _conv_bn(inputs, width, name="stem")
    for stage in range(stages):
        x = _residual(x, width * 2**stage, 1 if stage == 0 else 2, name=f"stage{stage}")
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = tfmp_layers.Float32Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="cnn")
