"""A text encoder classifier: embeddings, multi-head attention, LayerNorm, GELU feed-forward."""

from typing import Optional, Sequence

import keras
from keras import ops

from tfmp import layers as tfmp_layers

# `--size=large` (tools/bench): dim 256, wide enough for 16-bit matmul units to pay.
LARGE = dict(dim=256)
INPUT_KIND = "tokens"


@keras.saving.register_keras_serializable(package="tfmp_models")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned position embedding."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.seq_len, self.dim = vocab_size, seq_len, dim
        self.tokens = keras.layers.Embedding(vocab_size, dim, name="tokens")
        self.positions = keras.layers.Embedding(seq_len, dim, name="positions")

    def build(self, input_shape):
        self.tokens.build(input_shape)
        self.positions.build((self.seq_len,))
        self.built = True

    def call(self, ids):
        positions = ops.arange(ops.shape(ids)[-1])
        return self.tokens(ids) + self.positions(positions)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.dim)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "seq_len": self.seq_len, "dim": self.dim}


def _encoder_block(x, dim: int, heads: int, ff_mult: int, name: str):
    h = tfmp_layers.StableLayerNorm(name=f"{name}_ln1")(x)
    h = tfmp_layers.StableMultiHeadAttention(heads, dim // heads, name=f"{name}_attn")(h, h)
    x = keras.layers.Add(name=f"{name}_res1")([x, h])
    h = tfmp_layers.StableLayerNorm(name=f"{name}_ln2")(x)
    h = keras.layers.Dense(dim * ff_mult, activation="gelu", name=f"{name}_ff1")(h)
    h = keras.layers.Dense(dim, name=f"{name}_ff2")(h)
    return keras.layers.Add(name=f"{name}_res2")([x, h])


def build(
    input_shape: Sequence[int] = (64,),
    num_classes: int = 2,
    vocab_size: Optional[int] = 1000,
    dim: int = 64,
    heads: int = 4,
    depth: int = 2,
    ff_mult: int = 4,
) -> keras.Model:
    """Builds a pre-norm transformer encoder classifier with float32 logits.

    Args:
        input_shape: `(sequence_length,)` of integer token ids.
        num_classes: Number of output logits.
        vocab_size: Token vocabulary size.
        dim: Model width (a multiple of `heads`).
        heads: Attention heads (softmax in float32: `tfmp.layers.StableMultiHeadAttention`).
        depth: Encoder blocks.
        ff_mult: Feed-forward width as a multiple of `dim`.
    """
    if dim % heads:
        raise ValueError(f"dim={dim} must be a multiple of heads={heads}.")
    seq_len = int(input_shape[0])
    inputs = keras.Input((seq_len,), dtype="int32", name="token_ids")
    x = TokenAndPositionEmbedding(vocab_size or 1000, seq_len, dim, name="embed")(inputs)
    for i in range(depth):
        x = _encoder_block(x, dim, heads, ff_mult, name=f"block{i}")
    x = tfmp_layers.StableLayerNorm(name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = tfmp_layers.Float32Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="transformer")
