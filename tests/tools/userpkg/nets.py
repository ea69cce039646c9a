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
