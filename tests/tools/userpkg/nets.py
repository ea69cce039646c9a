"""The user's models: a Functional one (compiled or not) and a subclassed one with get_config."""

import keras

FEATURES, CLASSES = 6, 3


def functional(width=16, compiled=False, softmax=False):
    """A small classifier; logits unless `softmax`; compiled with SGD on logits if asked."""
    inputs = keras.Input((FEATURES,), name="features")
    hidden = keras.layers.Dense(width, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(CLASSES, activation="softmax" if softmax else None,
                                 dtype="float32", name="scores")(hidden)
    model = keras.Model(inputs, outputs)
    if compiled:
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["sparse_categorical_accuracy"])
    return model


@keras.saving.register_keras_serializable("userpkg")
class Small(keras.Model):
    """A subclassed model: two Dense layers (probabilities out), its own config."""

    def __init__(self, width=16, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.hidden = keras.layers.Dense(width, activation="relu")
        self.scores = keras.layers.Dense(CLASSES, activation="softmax", dtype="float32")

    def call(self, x):
        return self.scores(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def subclassed(width=16):
    return Small(width)


def not_a_model():
    return 3


def top_loss(y_true, y_pred):
    """A loss of the user's own, not registered with Keras."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


class Halving(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule of the user's own, not registered with Keras."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, step):
        return self.rate * 0.5 ** (keras.ops.cast(step, "float32") / 1000.0)

    def get_config(self):
        return {"rate": self.rate}


def custom_parts():
    """Compiled with an unregistered loss function and learning-rate schedule."""
    model = functional()
    model.compile(keras.optimizers.Adam(Halving(0.01)), top_loss, metrics=["accuracy"])
    return model


def two_heads():
    """Two outputs, a loss per output."""
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, {"a": keras.layers.Dense(CLASSES, name="a")(hidden),
                                 "b": keras.layers.Dense(1, name="b")(hidden)})
    model.compile("adam", {"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           "b": "mse"})
    return model


def raises():
    raise RuntimeError("out of memory building the model")
