"""tfmp.rewrite.replay: a batch run again in float32, the model left as it was."""

import keras
import numpy as np

from tfmp.rewrite.replay import computing_in_float32, half_dtypes, replay_in_float32


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(8, name="d")(inputs))
    outputs = keras.layers.Dense(1, name="head", dtype="float32")(h)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    return model


def test_the_replay_computes_in_float32_and_gives_everything_back():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = _model()
    x, y = np.random.RandomState(0).rand(16, 4).astype("float32") * 100, np.ones((16, 1))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    train_function = model.train_function
    stats = [v.numpy().copy() for v in model.get_layer("bn").non_trainable_variables]
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert half_dtypes(model) == {"bfloat16"}
    with computing_in_float32(model):
        assert half_dtypes(model) == set() and model.get_layer("d").compute_dtype == "float32"
        assert model.get_layer("head").dtype_policy.name == "float32"
    replay = replay_in_float32(model, (x, y), gradients=True)
    assert replay.finite and (replay.loss_finite, replay.gradients_finite) == (True, True)
    # the moving statistics a training-mode call updates, the policies, the traced step
    for before, after in zip(stats, model.get_layer("bn").non_trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())
    assert {layer.name: layer.dtype_policy.name for layer in model.layers} == policies
    assert model.train_function is train_function


def test_a_non_finite_float32_run_names_the_layer_and_op():
    model = _model()
    model.get_layer("d").kernel.assign(np.full((4, 8), 3e38, "float32"))
    replay = replay_in_float32(model, (np.ones((2, 4), "float32"), np.ones((2, 1))))
    assert not replay.finite and replay.loss_finite is False
    assert (replay.origins[0], replay.origin_op) == ("d", "MatMul")
