"""Models in the styles users write, small enough to train in a test: what `tfmp.prepare`,
`convert_policy`, `audit` and `export` must handle.

Each `KINDS` entry builds a model under Keras' global policy (float32 unless a test
sets another). `Kind.half` names layers whose matmuls must run in 16 bits after
`prepare` under a 16-bit policy; `Kind.float32` names layers that must stay float32.
"""

import dataclasses
from typing import Callable

import keras
import numpy as np
from keras import ops

PACKAGE = "tfmp_corpus"


@keras.saving.register_keras_serializable(PACKAGE)
class Block(keras.layers.Layer):
    """A custom layer with sublayers: Dense, BatchNormalization, ReLU."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, name="dense")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=False):
        return ops.relu(self.bn(self.dense(x), training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(PACKAGE)
class SubclassedNet(keras.Model):
    """`class Net(keras.Model)`: nested custom sublayers with BatchNormalization, a head."""

    def __init__(self, units=16, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.units, self.classes = units, classes
        self.block = Block(units, name="block")
        self.mid = keras.layers.Dense(units, activation="relu", name="mid")
        self.head = keras.layers.Dense(classes, name="head")

    def call(self, x, training=False):
        return self.head(self.mid(self.block(x, training=training)))

    def get_config(self):
        return {**super().get_config(), "units": self.units, "classes": self.classes}


@keras.saving.register_keras_serializable(PACKAGE)
class TwoHeadNet(keras.Model):
    """More output layers than hidden ones: a trunk and two heads, two outputs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trunk = keras.layers.Dense(16, activation="relu", name="trunk")
        self.cls = keras.layers.Dense(3, name="cls")
        self.box = keras.layers.Dense(1, name="box")

    def call(self, x):
        h = self.trunk(x)
        return self.cls(h), self.box(h)


class OpaqueNet(keras.Model):
    """A subclassed model Keras cannot re-create from a config (a callable argument)."""

    def __init__(self, activation=lambda x: x * 2.0):
        super().__init__()
        self.activation = activation
        self.dense = keras.layers.Dense(8, name="dense")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.activation(self.dense(x)))


@keras.saving.register_keras_serializable(PACKAGE)
class PatchEmbedding(keras.layers.Layer):
    """keras-hub's ViTPatchingAndEmbedding's trouble: `get_config` carries a derived key
    (`num_patches`) that `__init__` does not take, so `from_config` fails."""

    def __init__(self, hidden_dim, patch_size=4, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim, self.patch_size = hidden_dim, patch_size
        self.project = keras.layers.Dense(hidden_dim, name="project")

    def call(self, x):
        return self.project(x)

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size, "num_patches": 8 // self.patch_size}


@keras.saving.register_keras_serializable(PACKAGE)
class RMSNormUpcast(keras.layers.Layer):
    """Gemma's RMSNormalization: the statistics in float32 inside `call`."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        normed = x32 * ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + 1e-6)
        return ops.cast(normed * ops.cast(self.scale, "float32"), x.dtype)


@keras.saving.register_keras_serializable(PACKAGE)
class Rescale(keras.layers.Layer):
    """An RMS normalization in the compute dtype, under a name no rule knows."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-6) * self.scale


@keras.saving.register_keras_serializable(PACKAGE)
class HalfStatsNorm(Rescale):
    """The same, under a name that says it is a normalization (`*Norm`)."""


@keras.saving.register_keras_serializable(PACKAGE)
class Float32Matmul(keras.layers.Layer):
    """A layer that hard-codes float32 for its matmul whatever its policy."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 16), name="kernel")

    def call(self, x):
        return ops.cast(ops.matmul(ops.cast(x, "float32"), ops.cast(self.kernel, "float32")),
                        x.dtype)


@keras.saving.register_keras_serializable(PACKAGE)
class PostNormEncoder(keras.layers.Layer):
    """keras-hub's TransformerEncoder as BERT uses it: the norm after the residual add, and
    the add a plain `+` (no cast), so a float32 norm inside it would break its next add."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.ff1 = keras.layers.Dense(dim, activation="relu", name="ff1")
        self.norm1 = keras.layers.LayerNormalization(name="norm1")
        self.ff2 = keras.layers.Dense(dim, name="ff2")
        self.norm2 = keras.layers.LayerNormalization(name="norm2")

    def call(self, x):
        x = self.norm1(x + self.ff1(x))
        return self.norm2(x + self.ff2(x))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(PACKAGE)
class PostNormNet(keras.Model):
    """The same residual in a subclassed model's own `call`: its norms are the model's
    layers, and float32 ones would meet a 16-bit residual in a plain `+`."""

    def __init__(self, norm1=None, **kwargs):
        super().__init__(**kwargs)
        self.embed = keras.layers.Dense(16, name="embed")
        self.ff1 = keras.layers.Dense(16, name="ff1")
        self.norm1 = (norm1 or keras.layers.LayerNormalization)(name="norm1")
        self.ff2 = keras.layers.Dense(16, name="ff2")
        self.norm2 = keras.layers.LayerNormalization(name="norm2")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        x = self.embed(x)
        x = self.norm1(x + self.ff1(x))
        x = self.norm2(x + self.ff2(x))
        return self.head(x)


@keras.saving.register_keras_serializable(PACKAGE)
class Backbone(keras.Model):
    """keras-hub's Backbone: a Functional subclass whose `get_config` returns its
    constructor arguments and which passes its dtype to every layer."""

    def __init__(self, hidden_dim=16, num_layers=2, dtype=None, **kwargs):
        inputs = keras.Input((8,), name="features")
        x = PatchEmbedding(hidden_dim, dtype=dtype, name="patches")(inputs)
        for i in range(num_layers):
            x = keras.layers.Dense(hidden_dim, activation="gelu", dtype=dtype, name=f"ff_{i}")(x)
            x = RMSNormUpcast(dtype=dtype, name=f"norm_{i}")(x)
        x = PostNormEncoder(hidden_dim, dtype=dtype, name="encoder")(x)
        super().__init__(inputs, x, dtype=dtype, **kwargs)
        self.hidden_dim, self.num_layers = hidden_dim, num_layers

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy)}


@keras.saving.register_keras_serializable(PACKAGE)
class Classifier(keras.Model):
    """keras-hub's task: a Functional subclass holding its backbone."""

    def __init__(self, backbone, num_classes=3, **kwargs):
        inputs = backbone.input
        outputs = keras.layers.Dense(num_classes, name="logits")(backbone(inputs))
        super().__init__(inputs, outputs, **kwargs)
        self.backbone, self.num_classes = backbone, num_classes

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "num_classes": self.num_classes,
                "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("backbone")), **config)


def _subclassed():
    model = SubclassedNet(name="net")
    model(np.zeros((2, 8), "float32"))
    return model


def _two_heads():
    model = TwoHeadNet(name="two_heads")
    model(np.zeros((2, 8), "float32"))
    return model


def _opaque():
    model = OpaqueNet()
    model(np.zeros((2, 8), "float32"))
    return model


def _post_norm():
    model = PostNormNet(name="post_norm")
    model(np.zeros((2, 8), "float32"))
    return model


def _hub_style():
    return Classifier(Backbone(name="backbone"), name="classifier")


def _extra_key():
    inputs = keras.Input((8,))
    x = PatchEmbedding(16, name="patches")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="extra_key")


def _norms():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, name="dense")(inputs)
    x = RMSNormUpcast(name="upcast")(x)
    x = Rescale(name="rescale")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="norms")


def _hardcoded():
    inputs = keras.Input((8,))
    x = Float32Matmul(name="f32_matmul")(keras.layers.Dense(16, name="dense")(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="hardcoded")


def _two_in_two_out():
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared = keras.layers.Dense(16, activation="relu", name="shared")
    x = keras.layers.Concatenate(name="concat")([shared(a), shared(b)])
    return keras.Model([a, b], [keras.layers.Dense(3, name="classes")(x),
                                keras.layers.Dense(1, name="value")(x)], name="two_in_two_out")


def _nested_sequential():
    """A Sequential inside a Functional model, and `keras.ops` calls between layers (as
    keras.applications' hard-swish), the last one producing the output."""
    inner = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, name="inner_dense"),
                              keras.layers.LayerNormalization(name="inner_norm")], name="inner")
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, name="dense")(inputs)
    x = inner(x * keras.ops.relu6(x + 3.0) / 6.0)
    model = keras.Model(inputs, keras.ops.tanh(keras.layers.Dense(3, name="head")(x)) * 2.0,
                        name="outer")
    assert any(not isinstance(op, keras.layers.Layer) for op in model.operations)
    return model


def _application():
    """keras.applications' MobileNetV3Small (minimalistic: the smallest to trace)."""
    return keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, minimalistic=True, weights=None, classes=3,
        include_preprocessing=False, dropout_rate=0.0)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One model style: how to build it, and what must compute in which precision."""

    build: Callable[[], keras.Model]
    copied: bool  # prepare copies it (Keras can rebuild it layer by layer); else in place
    half: tuple[str, ...]  # layer paths whose matmuls/convolutions must run in 16 bits
    float32: tuple[str, ...] = ()  # layer paths whose matmuls must run in float32
    inputs: str = "vector"  # vector, pair (two inputs) or image
    outputs: int = 1
    min_share: float = 0.5  # of matmul/convolution FLOPs in 16 bits after prepare
    findings: tuple[str, ...] = ()  # audit codes expected after prepare (beside size infos)
    # Fit eagerly (Keras' own train step, no graph to trace): the models prepare copies,
    # Sequential and Functional ones whose graph training other tests cover; tracing
    # MobileNet's train step takes ~8 s on 2 cores. The models converted in place fit in graph.
    eager: bool = False


KINDS = {
    "subclassed": Kind(_subclassed, False, ("block/dense", "mid"), ("head",)),
    "subclassed_two_heads": Kind(_two_heads, False, ("trunk",), ("cls", "box"), outputs=2,
                                 min_share=0.3),
    "hub_style": Kind(_hub_style, False, ("backbone/patches/project", "backbone/ff_0",
                                          "backbone/ff_1", "backbone/encoder/ff2"), ("logits",)),
    # float32 norms break its own `+`: converted with no float32 layer, the output cast instead
    # Its LayerNormalizations keep the 16-bit policy (statistics float32 inside): their
    # outputs meet the 16-bit residual in a plain `+` without a cast, and the head is float32.
    "post_norm_residual": Kind(_post_norm, False, ("embed", "ff1", "ff2"), ("head",)),
    "extra_key_config": Kind(_extra_key, False, ("patches/project",), ("head",)),
    # `rescale` normalizes in 16 bits under a name no rule knows: prepare leaves it, the
    # audit finds it by its ops; `upcast` (Gemma's RMSNorm) computes in float32 inside.
    "norms": Kind(_norms, True, ("dense",), ("head",), findings=("normalization-half",),
                  eager=True),
    "hardcoded_float32": Kind(_hardcoded, True, ("dense",), ("f32_matmul", "head"),
                              min_share=0.25, findings=("heavy-op-float32",), eager=True),
    "two_in_two_out_shared": Kind(_two_in_two_out, True, ("shared",), ("classes", "value"),
                                  inputs="pair", outputs=2, eager=True),
    # its output is an op's (tanh): cast by a Float32Output, the head stays 16-bit
    "nested_sequential": Kind(_nested_sequential, True, ("dense", "inner/inner_dense", "head"),
                              eager=True),
    "mobilenet_v3": Kind(_application, True, ("conv", "expanded_conv_depthwise", "logits"),
                         inputs="image", eager=True),
}


def data(kind, n=16, seed=0):
    """`(x, y)` for a kind: labels for its first output (3 classes), 0/1 for a second."""
    rng = np.random.RandomState(seed)
    shape = (32, 32, 3) if kind.inputs == "image" else (8,)
    x = rng.rand(n, *shape).astype("float32")
    if kind.inputs == "pair":
        x = (x, rng.rand(n, 8).astype("float32"))
    y = rng.randint(0, 3, n)
    return x, (y if kind.outputs == 1 else (y, rng.rand(n, 1).astype("float32")))
