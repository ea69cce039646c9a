"""tfmp.app.compiling: what the training job compiles a model with, and the data checked
against it before training (in process, on tiny models)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from tfmp.app import compiling, data
from tfmp.app.config import TrainConfig


def _data(y, x=None):
    x = np.random.RandomState(0).rand(len(y), 4).astype("float32") if x is None else x
    ds = tf.data.Dataset.from_tensor_slices((x, np.asarray(y))).batch(8)
    return data.Data(ds, None, (4,), None, None, len(y), "mine")


def _model(loss):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", loss)
    return model


@pytest.mark.parametrize("loss", [
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "SparseCategoricalCrossentropy", "sparse_categorical_crossentropy",
    keras.losses.sparse_categorical_crossentropy])
def test_labels_past_the_outputs_are_refused_in_every_spelling_of_the_loss(loss):
    compiling.check_fit(_model(loss), _data([0, 1, 2, 1] * 4))
    with pytest.raises(data.DatasetError, match=r"mine's training labels range over \[0, 3\], "
                       r"but a sparse categorical loss takes class indices 0\.\.2"):
        compiling.check_fit(_model(loss), _data([0, 1, 2, 3] * 4))


def test_the_ignored_class_is_not_a_label_out_of_range():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    compiling.check_fit(_model(loss), _data([0, -1, 2, -1] * 4))
    with pytest.raises(data.DatasetError, match=r"range over \[0, 5\]"):
        compiling.check_fit(_model(loss), _data([0, -1, 5, -1] * 4))


def test_a_compiled_optimizer_is_copied_with_its_own_settings():
    model = _model("mse")
    model.compile(keras.optimizers.SGD(0.3, momentum=0.5, gradient_accumulation_steps=4), "mse")
    copy = compiling.compilation(model, TrainConfig(model="mine"), False).optimizer()
    assert copy is not model.optimizer and not copy.built
    assert (type(copy), copy.momentum, copy.gradient_accumulation_steps) == (
        keras.optimizers.SGD, 0.5, 4)
    assert float(copy.learning_rate) == pytest.approx(0.3)
    given = TrainConfig(model="mine", learning_rate=0.01, grad_accum_steps=2)
    copy = compiling.compilation(model, given, False).optimizer()
    assert (copy.gradient_accumulation_steps, float(copy.learning_rate)) == (2, pytest.approx(0.01))


def test_a_compensated_optimizer_is_copied_as_its_plain_class():
    model = _model("mse")
    model.compile(tfmp.compensate(keras.optimizers.SGD(0.2)), "mse")
    copy = compiling.compilation(model, TrainConfig(model="mine"), False).optimizer()
    assert type(copy) is keras.optimizers.SGD and float(copy.learning_rate) == pytest.approx(0.2)
