"""tfmp.compensate: 16-bit weights that learn as float32 ones do, on every path Keras takes."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from helpers import make_data, mirrored
from tfmp.compensation import CompensatedOptimizer, compensate

LR = 1e-4  # small: most bfloat16 updates are below half a unit of their weight
EPOCHS = 25


def _model(half="bfloat16", weights=None):
    """Two hidden layers in `half` (weights and compute), the output layer in float32."""
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", dtype=half),
        keras.layers.Dense(16, activation="relu", dtype=half),
        keras.layers.Dense(1, dtype="float32"),
    ])
    if weights is not None:
        model.set_weights(weights)
    return model


@functools.lru_cache(maxsize=None)
def _start():
    """Initial weights every run starts from: bfloat16 values, so float32 starts there too."""
    keras.utils.set_random_seed(1)
    return tuple(np.asarray(w.astype("float32"), "float32")
                 for w in _model("bfloat16").get_weights())


def _train(optimizer, half="bfloat16"):
    """EPOCHS epochs of 8 batches of 32, a traced step at a time (what `fit` does, without
    its per-step overhead: the trajectory tests take 200 steps each)."""
    x, y = (tf.constant(a) for a in make_data(256))
    model = _model(half, list(_start()))
    loss_fn = keras.losses.MeanSquaredError()
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def epoch():
        return np.mean([float(step(x[32 * i:32 * i + 32], y[32 * i:32 * i + 32]))
                        for i in range(8)])

    return model, [float(epoch()) for _ in range(EPOCHS)]


@functools.lru_cache(maxsize=None)
def _float32_losses():
    return tuple(_train(keras.optimizers.Adam(LR), half="float32")[1])


@pytest.mark.parametrize("rounding", ["stochastic", "kahan", "nearest"])
def test_compensated_bfloat16_follows_float32_and_the_lost_share_moves(rounding):
    reference = _float32_losses()
    opt = compensate(keras.optimizers.Adam(LR), rounding=rounding, lost_updates_every=4, seed=3)
    model, losses = _train(opt)
    assert str(model.layers[0].kernel.dtype) == "bfloat16"
    assert str(model.layers[2].kernel.dtype) == "float32"
    drop = reference[0] - reference[-1]
    assert drop > 0.1 * reference[0]  # float32 learns: there is a trajectory to follow
    gap = abs(losses[-1] - reference[-1]) / reference[-1]
    if rounding == "nearest":  # Keras' rounding: most small updates are lost
        assert gap > 0.1, (losses[-1], reference[-1])
        assert opt.lost_updates > 0.5
    else:
        assert gap < 0.02, (losses[-1], reference[-1])
        # Kahan: measured, almost none lost; stochastic rounding loses none in expectation
        assert opt.lost_updates < 0.1 if rounding == "kahan" else opt.lost_updates is None


def test_stock_bfloat16_is_the_failure_compensation_fixes():
    reference = _float32_losses()
    _, losses = _train(keras.optimizers.Adam(LR))
    assert abs(losses[-1] - reference[-1]) / reference[-1] > 0.1


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_weight_decay_of_16_bit_weights_is_kept(rounding):
    # lr * wd = 1e-3 a step: below half a bfloat16 unit at 1.0, so Keras' decay is lost.
    variable = keras.Variable(np.ones((2000,), "float32"), dtype="bfloat16")
    opt = compensate(keras.optimizers.AdamW(1e-2, weight_decay=0.1), rounding=rounding, seed=5)
    stock = keras.optimizers.AdamW(1e-2, weight_decay=0.1)
    stock_variable = keras.Variable(np.ones((2000,), "float32"), dtype="bfloat16")
    zeros = tf.zeros((2000,), "bfloat16")
    steps = tf.function(lambda: (opt.apply([zeros], [variable]),
                                 stock.apply([zeros], [stock_variable])))
    for _ in range(200):  # zero gradients: only the decay moves the weights
        steps()
    expected = (1 - 1e-3) ** 200
    held = variable.numpy().astype("float64")
    if rounding == "kahan":
        held = held + opt._kahan[0].numpy().astype("float64")
    assert abs(held.mean() - expected) < 2e-3
    assert np.all(stock_variable.numpy().astype("float32") == 1.0)


def test_sgd_momentum_slots_and_accumulators_take_the_chosen_dtypes():
    variable = keras.Variable(np.ones((4,), "float32"), dtype="bfloat16")
    opt = compensate(keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2),
                     rounding="kahan", slots_dtype="float32")
    opt.build([variable])
    dtypes = {v.path.split("/")[-1]: str(v.dtype) for v in opt.variables}
    assert dtypes["variable_momentum"] == "float32"
    assert dtypes["variable_gradient_accumulator"] == "float32"
    assert dtypes["variable_kahan"] == "bfloat16"
    for _ in range(4):
        opt.apply([tf.fill((4,), tf.constant(1e-3, "bfloat16"))], [variable])
    assert int(opt.iterations.numpy()) == 2  # updates, not micro-batches


def test_replicas_round_alike_under_mirrored_strategy():
    x, y = make_data(64)
    with mirrored().scope():
        model = _model("bfloat16", list(_start()))
        opt = compensate(keras.optimizers.Adam(1e-3), seed=9)
        model.compile(opt, "mse")
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    checked = 0
    for variable in model.trainable_variables + opt.variables:
        copies = [np.asarray(c.numpy(), "float32") for c in variable.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)
        checked += str(variable.dtype) == "bfloat16"
    assert checked >= 4  # the 16-bit weights and their 16-bit moments


def test_a_skipped_step_changes_no_float16_weight_buffer_or_slot():
    variables = [keras.Variable(np.ones((3,), "float32"), dtype="float16", name="w")]
    opt = tfmp.DynamicLossScaleOptimizer(
        compensate(keras.optimizers.Adam(1e-3), rounding="kahan"), initial_scale=8.0)
    opt.apply([tf.constant([1.0, 2.0, 3.0], "float16")], variables)
    before = [np.asarray(v.numpy(), "float32") for v in variables + opt.inner_optimizer.variables]
    opt.apply([tf.constant([1.0, np.inf, 3.0], "float16")], variables)
    after = [np.asarray(v.numpy(), "float32") for v in variables + opt.inner_optimizer.variables]
    assert int(opt.skipped_steps.numpy()) == 1
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    opt.apply([tf.constant([1.0, 2.0, 3.0], "float16")], variables)
    assert np.any(np.asarray(variables[0].numpy(), "float32") != before[0])


def test_stochastic_rounding_refuses_float16_weights():
    opt = compensate(keras.optimizers.Adam(), rounding="stochastic")
    with pytest.raises(ValueError, match="float16 weights: use rounding='kahan'"):
        opt.build([keras.Variable(np.ones((3,), "float32"), dtype="float16")])


def test_saved_and_loaded_it_rounds_on_as_if_never_interrupted(tmp_path):
    x, y = make_data(64)

    def fresh(seed):
        model = _model("bfloat16", list(_start()))
        model.compile(compensate(keras.optimizers.Adam(1e-3), rounding="stochastic",
                                 seed=seed), "mse")
        return model

    straight = fresh(21)
    straight.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    first = fresh(21)
    first.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    first.save_weights(tmp_path / "half.weights.h5")
    resumed = fresh(999)  # another seed given: the saved one is restored with the weights
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(tmp_path / "half.weights.h5")
    resumed.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(np.asarray(a, "float32"), np.asarray(b, "float32"))
    # a .keras file brings back the same class, options and state
    straight.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    assert isinstance(loaded.optimizer, CompensatedOptimizer)
    assert (loaded.optimizer.rounding, loaded.optimizer.seed) == ("stochastic", 21)
    for a, b in zip(straight.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.numpy(), "float32"),
                                      np.asarray(b.numpy(), "float32"))


@pytest.mark.parametrize("kwargs, message", [
    ({"rounding": "up"}, "rounding='up': use one of stochastic, kahan, nearest"),
    ({"slots_dtype": "float16"}, "slots_dtype='float16': use one of bfloat16, float32"),
    ({"lost_updates_every": -1}, "lost_updates_every=-1"),
    ({"seed": 1.5}, "seed=1.5"),
])
def test_bad_options_are_refused_and_the_optimizer_is_left_as_it_was(kwargs, message):
    opt = keras.optimizers.Adam()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        compensate(opt, **kwargs)
    assert type(opt) is keras.optimizers.Adam


def test_the_moving_average_of_16_bit_weights_moves_as_float32_s():
    # Keras computes the EMA momentum in the weight's dtype: 0.999 is 1.0 in bfloat16.
    def average(dtype):
        variable = keras.Variable(np.ones((4,), "float32"), dtype=dtype)
        opt = keras.optimizers.SGD(1.0, use_ema=True, ema_momentum=0.999)
        if dtype == "bfloat16":
            opt = compensate(opt, rounding="kahan")
        for _ in range(50):  # the weight goes up by 1 a step
            opt.apply([tf.fill((4,), tf.constant(-1.0, dtype))], [variable])
        return float(opt._model_variables_moving_average[0].numpy()[0])

    reference = average("float32")
    assert reference > 2.0
    assert abs(average("bfloat16") - reference) < 0.02 * reference


def test_an_optimizer_with_its_own_weight_decay_is_refused_and_every_keras_class_loadable():
    with pytest.raises(ValueError, match="Muon applies its weight decay its own way"):
        compensate(keras.optimizers.Muon(0.1, weight_decay=0.1))
    for name, cls in vars(keras.optimizers).items():
        if (isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)
                and cls is not keras.optimizers.Optimizer
                and not issubclass(cls, keras.optimizers.LossScaleOptimizer)):
            registered = keras.saving.get_registered_object(f"tfmp>Compensated{cls.__name__}")
            assert registered is not None and issubclass(registered, cls), name


def test_built_twice_compensated_or_not_an_optimizer_is_refused():
    built = keras.optimizers.Adam()
    built.build([keras.Variable(np.ones(2, "float32"))])
    with pytest.raises(ValueError, match="built already"):
        compensate(built)
    with pytest.raises(ValueError, match="compensated already"):
        compensate(compensate("adam"))
    with pytest.raises(ValueError, match="takes a Keras optimizer"):
        compensate(object())
    wrapped = tfmp.DynamicLossScaleOptimizer(keras.optimizers.SGD())
    assert compensate(wrapped) is wrapped
    assert isinstance(wrapped.inner_optimizer, CompensatedOptimizer)


def test_the_lost_share_is_sampled_every_n_updates_on_a_few_elements():
    variable = keras.Variable(np.ones((100, 100), "float32"), dtype="bfloat16")
    opt = compensate(keras.optimizers.SGD(1.0), rounding="nearest", lost_updates_every=3)
    seen = []
    for step in range(7):  # updates of 1e-3 (lost at 1.0) and, from step 4, of 0.5 (kept)
        size = 1e-3 if step < 4 else 0.5
        opt.apply([tf.fill((100, 100), tf.constant(-size, "bfloat16"))], [variable])
        seen.append(opt.lost_updates)
    # sampled at updates 0, 3 and 6 only; the share moves from all lost to none lost
    assert seen == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    counted = float(opt._counts[0].numpy()[1])
    assert 0 < counted <= 4096 < 100 * 100  # a sample of the elements, not all of them


@pytest.mark.parametrize("options, guard", [
    ({"gradient_accumulation_steps": 2}, False), ({"gradient_accumulation_steps": 2}, True),
    ({"use_ema": True, "ema_overwrite_frequency": 3}, False), ({"global_clipnorm": 1.0}, False),
], ids=["accumulation", "accumulation-guarded", "ema", "global_clipnorm"])
def test_keras_optimizer_options_work_with_16_bit_weights_and_a_float32_head(options, guard):
    x, y = make_data(64)
    model = _model("bfloat16", list(_start()))
    opt = compensate(keras.optimizers.Adam(1e-2, **options))
    model.compile(tfmp.wrap_optimizer(opt, "bf16", guard=True) if guard else opt, "mse")
    losses = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    assert [str(v.dtype) for v in model.trainable_variables][::2] == [
        "bfloat16", "bfloat16", "float32"]
    if "use_ema" in options:  # averages kept in float32, written back into bfloat16 weights
        averages = [str(a.dtype) for a in opt._model_variables_moving_average]
        assert set(averages) == {"float32"}
