"""The loss compare_precision and tune train with: given, compiled, or the one the output needs."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from tfmp._messages import TfmpWarning
from tfmp.measure.losses import choose_loss
from tfmp.precision import HardwareInfo

CPU = HardwareInfo("cpu", (), (), frozenset({"avx512_bf16"}))
X = np.random.RandomState(0).normal(0, 3, (48, 8)).astype("float32")  # confident outputs
Y = np.random.RandomState(1).randint(0, 4, 48)
BATCH = (X[:16], Y[:16])
SOFTMAX_WARNING = "received `from_logits=True`, but the `output` argument was produced by"
PROBABILITIES = "SparseCategoricalCrossentropy(from_logits=False): probabilities output"
LOGITS = "SparseCategoricalCrossentropy(from_logits=True): logits output"


def _sequential(*head):
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"), *head])


class SoftmaxInCall(keras.Model):
    """A subclassed model whose own `call` applies the softmax."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)

    def call(self, x):
        return keras.ops.softmax(self.dense(x))


class SoftmaxAfterBranch(SoftmaxInCall):
    """A subclassed model that cannot be traced without autograph."""

    def call(self, x):
        return super().call(PythonBranch()(x))


class PythonBranch(keras.layers.Layer):
    """Branches in Python on a tensor's value: cannot be traced without autograph."""

    def call(self, x):
        return x if keras.ops.sum(x) > 0 else -x

    def compute_output_shape(self, shape):
        return shape


def _built(model):
    model(X[:2])
    return model


L = keras.layers
HEADS = {  # the layers after a hidden Dense: what the output is
    "dense softmax": lambda: [L.Dense(4, activation="softmax", name="out")],
    "Softmax layer": lambda: [L.Dense(4), L.Softmax(name="out")],
    "Activation": lambda: [L.Dense(4), L.Activation("softmax", name="out")],
    # a 16-bit softmax cast to a float32 output: read through the cast (Keras' own check is not)
    "cast": lambda: [L.Dense(4, activation="softmax", dtype="mixed_bfloat16", name="out"),
                     tfmp.layers.Float32Output()],
    "StableSoftmax": lambda: [L.Dense(4), tfmp.layers.StableSoftmax(name="out")],
    "sigmoid": lambda: [L.Dense(1, activation="sigmoid", name="out")],
    "logits": lambda: [L.Dense(4, name="out")],
    "log_softmax": lambda: [L.Dense(4, activation="log_softmax", name="out")],  # log-probabilities
}


@pytest.mark.parametrize("head, expected", [
    ("dense softmax", PROBABILITIES + " (softmax in 'out')"),
    ("Softmax layer", PROBABILITIES + " (softmax in 'out')"),
    ("Activation", PROBABILITIES + " (softmax in 'out')"),
    ("cast", PROBABILITIES + " (softmax in 'out')"),
    ("StableSoftmax", PROBABILITIES + " (softmax in 'out')"),
    ("sigmoid", "BinaryCrossentropy(from_logits=False): probabilities output (sigmoid in 'out')"),
    ("logits", LOGITS + " ('out' applies no softmax or sigmoid)"),
    ("log_softmax", LOGITS + " ('out' applies no softmax or sigmoid)"),
])
def test_the_loss_follows_the_output(head, expected):
    chosen = choose_loss(_sequential(*HEADS[head]()), None, BATCH)
    assert chosen.description == expected
    assert type(chosen.fn).__name__ == expected.split("(")[0]
    assert chosen.fn.get_config()["from_logits"] == ("from_logits=True" in expected)


def test_the_output_is_read_for_any_model_kind_and_without_a_trace():
    chosen = choose_loss(_built(SoftmaxInCall()), None, BATCH)  # the trace sees the op
    assert chosen.description.startswith(PROBABILITIES + " (softmax in '<model>')")
    # A model that cannot be traced: its output layer's config is read instead...
    for head in ("dense softmax", "Softmax layer", "StableSoftmax"):
        inputs = keras.Input((8,))
        outputs = PythonBranch()(inputs)
        for layer in HEADS[head]():
            outputs = layer(outputs)
        chosen = choose_loss(keras.Model(inputs, outputs), None, BATCH)
        assert chosen.description == PROBABILITIES + " (softmax in 'out')", head
    # ...and where there is none, the assumption is said, and warned about.
    untraceable = _built(SoftmaxAfterBranch())  # no output layer to read either
    with pytest.warns(TfmpWarning, match=r"assumed, the output could not be read \(.*give loss="):
        chosen = choose_loss(untraceable, None, BATCH)
    assert chosen.fn.get_config()["from_logits"] is True


def test_a_given_loss_wins_then_the_compiled_one_and_a_contradiction_is_warned_about():
    softmax = _sequential(keras.layers.Dense(4, activation="softmax", name="out"))
    given = keras.losses.CategoricalHinge()
    softmax.compile("adam", "sparse_categorical_crossentropy")
    chosen = choose_loss(softmax, given, BATCH)
    assert chosen.fn is given and chosen.description == "CategoricalHinge: given (loss=)"
    chosen = choose_loss(softmax, None, BATCH)
    assert chosen.description == ("sparse_categorical_crossentropy(from_logits=False): the "
                                  "model's compiled loss")
    # a loss function (a compiled name, a lambda) is averaged over the batch, as compile does
    pred = softmax(X[:16])
    mean = float(np.mean(keras.losses.sparse_categorical_crossentropy(Y[:16], pred)))
    assert float(chosen.fn(Y[:16], pred)) == pytest.approx(mean, rel=1e-6)
    chosen = choose_loss(softmax, lambda y, p: keras.losses.sparse_categorical_crossentropy(y, p),
                         BATCH)
    assert chosen.description == "<lambda>: given (loss=)"
    assert float(tf.function(chosen.fn)(Y[:16], pred)) == pytest.approx(mean, rel=1e-6)
    with pytest.warns(TfmpWarning, match=r"given \(loss=\); from_logits=True, but the output is "
                                         r"probabilities \(softmax in 'out'\)"):
        choose_loss(softmax, keras.losses.SparseCategoricalCrossentropy(from_logits=True), BATCH)
    logits = _sequential(keras.layers.Dense(4, name="out"))
    logits.compile("adam", "sparse_categorical_crossentropy")
    with pytest.warns(TfmpWarning, match=r"compiled loss; from_logits=False, but the output is "
                                         r"logits \('out' applies no softmax or sigmoid\)"):
        choose_loss(logits, None, BATCH)


def test_one_logit_is_binary_classification():
    inputs = keras.Input((8,))
    one = keras.Model(inputs, keras.layers.Dense(1, name="logit")(inputs))
    chosen = choose_loss(one, None, BATCH)
    assert isinstance(chosen.fn, keras.losses.BinaryCrossentropy) and chosen.fn.from_logits
    assert "one logit ('logit' has one unit and no sigmoid" in chosen.description


def test_no_loss_that_fits_is_one_clear_line():
    inputs = keras.Input((8,))
    two = keras.Model(inputs, [keras.layers.Dense(4, activation="softmax", name="probs")(inputs),
                               keras.layers.Dense(4, name="logits")(inputs)])
    for compiled in (None, "sparse_categorical_crossentropy", ["mse"] * 2):
        if compiled:  # a loss Keras would apply to each output, or one per output
            two.compile("adam", compiled)
        with pytest.raises(ValueError, match=r"^the model has 2 outputs \(probs, logits\): give "
                                             r"loss= a function of \(y_true, y_pred\) for all"):
            choose_loss(two, None, BATCH)
    with pytest.raises(ValueError, match=r"^loss=3 is not a loss: give a Keras loss name, a "):
        choose_loss(two, 3, BATCH)


E2E_HEADS = {
    # Keras finds the logits behind a softmax output itself, and warns: the Quick start's model
    "softmax": lambda: [L.Dense(4, activation="softmax", name="out")],
    # ...not behind a reshape: probabilities taken for logits, silently
    "softmax, reshaped": lambda: [L.Dense(4, activation="softmax", name="out"), L.Reshape((4,))],
    "logits": lambda: [L.Dense(4, name="out")],
}


@pytest.mark.parametrize("head, from_logits", [
    ("softmax", False), ("softmax, reshaped", False), ("logits", True)])
def test_compare_precision_and_tune_train_with_the_loss_the_output_needs(head, from_logits):
    def build():
        return _sequential(*E2E_HEADS[head]())

    keras.utils.set_random_seed(0)  # as compare_precision builds the model: its first loss
    outputs = np.asarray(build()(BATCH[0], training=True))  # (an array: nothing to recover)
    expected, wrong = (float(keras.losses.SparseCategoricalCrossentropy(from_logits=f)(
        BATCH[1], outputs)) for f in (from_logits, not from_logits))
    assert abs(expected - wrong) > 0.1  # the test tells the two apart
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tfmp.compare_precision(build, ds, policies=("fp32", "bf16"), steps=3,
                                        hardware=CPU)
        tuned = tfmp.tune(build, ds, steps=3, hardware=CPU, xla=False, tolerance=0.5)
    assert not [w for w in caught if SOFTMAX_WARNING in str(w.message)]
    assert result.runs[0].losses[0] == pytest.approx(expected, rel=1e-4)  # float32
    assert tuned.comparison.runs[0].losses[0] == pytest.approx(expected, rel=1e-4)
    line = (f"loss: SparseCategoricalCrossentropy(from_logits={from_logits}): "
            + ("logits output ('out' applies no softmax or sigmoid)" if from_logits
               else "probabilities output (softmax in 'out')"))
    assert line in str(result).splitlines() and result.to_dict()["loss"] == result.loss
    assert tuned.loss == result.loss and tuned.to_dict()["loss"] == tuned.loss
