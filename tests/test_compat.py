"""tfmp._compat: each Keras / TensorFlow / LiteRT internal tfmp relies on, exercised on the
installed versions. A failure here names the Keras version: an internal changed, and the
fence (not the rest of tfmp) is where to adapt."""

import json
import os

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tfmp
from helpers import Subclassed, mirrored
from tfmp import _compat


def expect(condition, what):
    assert condition, (f"Keras {keras.__version__} / TensorFlow {tf.__version__} (tfmp checked "
                       f"against Keras {_compat.CHECKED_WITH}): {what}")


def _dense_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"),
                             keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(1, name="out")])


# ------------------------------------------------------------------- layers and models

def test_layer_walk_and_own_variables():
    inner = _dense_model()
    outer = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="top")])
    names = [l.name for l in _compat.flatten_layers(outer, include_self=False, recursive=True)]
    expect({"d", "bn", "out", "top"} <= set(names), f"Layer._flatten_layers gave {names}")
    direct = [l.name for l in _compat.flatten_layers(outer, recursive=False)]
    expect("d" not in direct and inner.name in direct, f"non-recursive walk gave {direct}")
    bn = inner.get_layer("bn")
    expect(len(_compat.own_variables(bn)) == 4, "BatchNormalization owns gamma, beta and 2 stats")
    stats = {v.name for v in _compat.own_non_trainable_variables(bn)}
    expect(stats == {"moving_mean", "moving_variance"}, f"non-trainable variables: {stats}")
    expect(_compat.own_variables(outer) == [], "a model owns none of its layers' variables")


@pytest.mark.parametrize("scope", ["default", "mirrored"])
def test_a_variable_is_recast_in_place_and_put_back(scope):
    strategy = mirrored() if scope == "mirrored" else tf.distribute.get_strategy()
    with strategy.scope():
        model = _dense_model()
    kernel = model.get_layer("d").kernel
    before, backing = kernel.numpy(), kernel.value
    undo = _compat.recast_variable(kernel, "bfloat16")
    expect(kernel.dtype == "bfloat16" and kernel.value.dtype == tf.bfloat16,
           "KerasVariable._initialize makes a new backend variable in KerasVariable._dtype")
    expect(type(kernel.value) is type(backing), f"recast outside the scope: {type(backing)} "
           f"became {type(kernel.value)} (the variable's own strategy must make it)")
    expect(model.get_layer("d").kernel is kernel and kernel.path == "sequential/d/kernel"
           and kernel.trainable, "the same Keras variable, its path and trainability kept")
    np.testing.assert_array_equal(np.asarray(kernel.numpy(), "float32"),
                                  before.astype(ml_dtypes.bfloat16).astype("float32"))
    kernel.assign(np.ones((4, 3), "float32"))  # assign casts to the new dtype
    expect(kernel.value.dtype == tf.bfloat16, "assign keeps the new backend variable's dtype")
    undo()
    expect(kernel.dtype == "float32" and kernel.value is backing, "put back as it was")
    np.testing.assert_array_equal(kernel.numpy(), before)


def test_symbolic_tensors_know_their_producer_and_models_their_output_structure():
    x = keras.Input((4,))
    head = keras.layers.Dense(2, name="head")
    model = keras.Model(x, {"a": head(x), "b": keras.layers.Dense(1)(x)})
    expect(_compat.producer(model.outputs[0]) in (head, model.get_layer("dense")),
           "KerasTensor._keras_history.operation")
    expect(isinstance(_compat.outputs_structure(model), dict), "Functional._outputs_struct")
    expect(isinstance(model, _compat.functional_class())
           and not isinstance(_dense_model(), _compat.functional_class()),
           "keras.src.models.functional.Functional (keras.Model(inputs, outputs), not Sequential)")


def test_a_layer_knows_the_tensors_it_was_called_on_in_a_graph():
    x = keras.Input((4,))
    norm = keras.layers.LayerNormalization(name="norm")
    shared = keras.layers.Dense(3, name="shared")
    a, b = shared(norm(x)), shared(x)
    keras.Model(x, [a, b])
    producers = [_compat.producer(t) for t in _compat.inbound_tensors(shared)]
    expect([getattr(p, "name", None) for p in producers] == ["norm", "input_layer"],
           f"Layer._inbound_nodes[*].input_tensors, every call: {producers}")


def test_an_instance_call_takes_the_place_of_the_class_call():
    # Keras' Operation.__call__ looks `self.call` up at every call: what tracing (calls_wrapped)
    # and the float32 output cast of a model converted in place (set_instance_call) rely on.
    model = _dense_model()
    x = np.ones((2, 4), "float32")
    seen = []

    def wrapper(layer, call):
        def wrapped(*args, **kwargs):
            seen.append(layer.name)
            return call(*args, **kwargs)
        return wrapped

    with _compat.calls_wrapped(_compat.flatten_layers(model, include_self=True), wrapper):
        model(x)
        tf.function(lambda t: model(t))(x)
    expect(seen.count("d") == 2 and seen.count(model.name) == 2, f"wrapped calls seen: {seen}")
    expect("call" not in vars(model.get_layer("d")), "calls_wrapped restores the class's call")
    _compat.set_instance_call(model, lambda *a, **k: keras.ops.zeros((2, 1)))
    expect(float(keras.ops.sum(model(x))) == 0.0, "an instance call is what Layer.__call__ runs")


def test_a_trace_leaves_no_graph_tensor_in_the_model_losses():
    class WithLoss(keras.layers.Layer):
        def call(self, x):
            self.add_loss(keras.ops.sum(x))
            return x

    model = keras.Sequential([keras.Input((3,)), WithLoss(), keras.layers.Dense(1)])
    tfmp.rewrite.run_model(model)
    expect(model.losses == [], f"Layer._clear_losses: losses left after a trace: {model.losses}")


def test_a_metric_attached_to_a_built_subclassed_model_reaches_the_logs():
    model = Subclassed()
    model(np.ones((2, 4), "float32"))
    with pytest.raises(ValueError, match="cannot add new elements of state"):
        model.extra = keras.metrics.Mean(name="extra")  # why tfmp does not set an attribute
    metric = keras.metrics.Mean(name="extra")
    metric.update_state(3.0)
    _compat.attach_metric(model, metric)
    model.compile("sgd", "mse")
    _compat.forget_traced_functions(model)
    logs = model.evaluate(np.ones((2, 4)), np.ones((2, 2)), verbose=0, return_dict=True)
    expect("extra" in logs, f"Layer._metrics: a metric appended there is in the logs ({logs})")


def test_registered_names_are_stable():
    # .keras files saved before tfmp's modules moved name their classes this way.
    for obj, name in [(tfmp.layers.StableLayerNorm, "tfmp>StableLayerNorm"),
                      (tfmp.layers.StableSoftmax, "tfmp>StableSoftmax"),
                      (tfmp.layers.StableMultiHeadAttention, "tfmp>StableMultiHeadAttention"),
                      (tfmp.layers.Float32Dense, "tfmp>Float32Dense"),
                      (tfmp.layers.Float32Output, "tfmp>Float32Output"),
                      (tfmp.DynamicLossScaleOptimizer, "tfmp>DynamicLossScaleOptimizer"),
                      (tfmp.rewrite.float32_gelu, "tfmp>float32_gelu")]:
        expect(keras.saving.get_registered_name(obj) == name, name)
        expect(keras.saving.get_registered_object(name) is obj, name)


def test_attention_probabilities_come_from_the_float32_softmax():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = tfmp.layers.StableMultiHeadAttention(num_heads=2, key_dim=4)
    x = keras.ops.cast(np.random.RandomState(0).rand(2, 5, 8), "bfloat16")
    layer(x, x)
    softmax = layer._softmax
    expect(isinstance(softmax, tfmp.layers.StableSoftmax), "MultiHeadAttention._build_attention")
    sublayers = _compat.flatten_layers(layer)
    expect(not any(type(l) is keras.layers.Softmax for l in sublayers),
           "MultiHeadAttention._tracker: the stock Softmax is no longer a sublayer")
    calls = []
    stock_call = softmax.call
    softmax.call = lambda *a, **k: calls.append(1) or stock_call(*a, **k)
    out = layer(x, x)
    expect(calls, "MultiHeadAttention._compute_attention no longer calls self._softmax on the "
           "explicit path: the attention softmax would run in bfloat16")
    expect(keras.backend.standardize_dtype(out.dtype) == "bfloat16", "outputs in the compute dtype")


# ------------------------------------------------------------------------- optimizers

def test_the_restated_loss_scale_build_is_keras_build():
    v = [keras.Variable(np.ones(2, "float32"), name="a")]
    stock = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(), initial_scale=8.0)
    stock.build(v)
    ours = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(), initial_scale=8.0)
    _compat.build_scale_state(ours)  # the scale first (what scale_loss reads), then the rest
    _compat.build_after_scale_state(ours, v)

    def described(opt):
        return [(x.name, x.dtype, tuple(x.shape), x.numpy().tolist()) for x in opt.variables]

    expect(described(ours) == described(stock) and ours.built and ours.inner_optimizer.built,
           "LossScaleOptimizer.build creates step_counter and dynamic_scale, then builds the "
           "inner optimizer, then Optimizer.build")


def test_optimizer_counters_and_variable_order():
    v = [keras.Variable(np.ones(2, "float32"), name="a"), keras.Variable(np.ones(3, "float32"))]
    opt = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    for _ in range(4):
        opt.apply([tf.ones(2), tf.ones(3)], v)
    expect(int(_compat.micro_batches(opt).numpy()) == 4, "BaseOptimizer._iterations counts calls")
    expect(int(opt.iterations.numpy()) == 2, "iterations counts updates under accumulation")
    expect(_compat.built_variables(opt) == v, "BaseOptimizer._trainable_variables")
    expect(_compat.variable_index(opt, v[1]) == 1, "BaseOptimizer._get_variable_index")
    flagged = keras.Variable(np.zeros(2, "float32"))
    flagged.overwrite_with_gradient = True
    expect(_compat.overwrites_with_gradient(opt, flagged)
           and not _compat.overwrites_with_gradient(opt, v[0]),
           "BaseOptimizer._overwrite_variable_with_gradient")


FEATURES = {  # each of what BaseOptimizer.apply() does, on its own
    "constraint": {},
    "adamw_weight_decay": dict(optimizer="adamw", weight_decay=0.5),
    "clipnorm": dict(clipnorm=0.01),
    "clipvalue": dict(clipvalue=0.002),
    "global_clipnorm": dict(global_clipnorm=0.01),
    "ema_overwrite": dict(use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=3),
    "loss_scale_factor": dict(optimizer="sgd", loss_scale_factor=4.0),  # Adam would not see it
    "schedule": dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)),
    "overwrite_with_gradient": {},
}


def _optimizer(feature, accumulation):
    kwargs = dict(FEATURES[feature])
    name = kwargs.pop("optimizer", "adam")
    kwargs.setdefault("learning_rate", 0.1)
    cls = {"adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}.get(
        name, keras.optimizers.Adam)
    return cls(gradient_accumulation_steps=accumulation, **kwargs)


def _variables(feature):
    v = [keras.Variable(np.linspace(-1, 1, 3).astype("float32"), name="w"),
         keras.Variable(np.full(2, 5.0, "float32"), name="s")]
    if feature == "constraint":  # keras.Variable(constraint=...) is ignored in Keras 3.15
        v[0].constraint = keras.constraints.NonNeg()
        expect(v[0].constraint is not None, "Variable.constraint can be set")
    if feature == "overwrite_with_gradient":
        v[1].overwrite_with_gradient = True
    return v


def _gradients(step):
    rng = np.random.RandomState(step)
    return [tf.constant(rng.randn(3).astype("float32")),
            tf.constant(rng.rand(2).astype("float32") + step)]


@pytest.mark.parametrize("accumulation", [None, 3], ids=["plain", "accumulate3"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_the_restated_apply_is_keras_apply(feature, accumulation):
    # tfmp re-states the order of BaseOptimizer.apply() (apply_decided, the EMA overwrite,
    # finish_apply) for the distributed path; on one device it must give what apply() gives.
    stock_v, stock = _variables(feature), _optimizer(feature, accumulation)
    ours_v, ours = _variables(feature), _optimizer(feature, accumulation)
    ours.build(ours_v)
    for step in range(7):
        grads = _gradients(step)
        stock.apply(grads, stock_v)
        update = (not accumulation
                  or (int(_compat.micro_batches(ours).numpy()) + 1) % accumulation == 0)
        _compat.apply_decided(ours, grads, ours_v, update)
        due = _compat.ema_overwrite_due(ours)
        if due is not False and bool(due):
            _compat.overwrite_with_ema(ours)
        _compat.finish_apply(ours, grads, ours_v)
    for a, b in zip(stock_v + stock.variables, ours_v + ours.variables):
        expect(np.allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7),
               f"{feature}: BaseOptimizer.apply() now does something tfmp._compat.apply_decided "
               f"does not ({a.path}: {a.numpy()} vs {b.numpy()})")


# ---------------------------------------------------------------- models and trainers

def test_a_stand_in_finds_its_variable_slots_and_decay_is_left_to_the_subclass():
    class Viewed(_compat.ViewedUpdates, keras.optimizers.AdamW):
        stand_ins = {}

        def view_owner(self, variable):
            return self.stand_ins.get(id(variable))

        def decays_itself(self, variable):
            return variable.name == "mine"

    mine, theirs = (keras.Variable(np.ones(3, "float32"), name=n) for n in ("mine", "theirs"))
    opt = Viewed(0.1, weight_decay=0.5)
    opt.build([mine, theirs])
    stand_in = tf.ones(3)
    Viewed.stand_ins[id(stand_in)] = mine.value
    expect(opt._get_variable_index(stand_in) == 0, "BaseOptimizer._get_variable_index reads "
           "_var_key: a stand-in keyed by its variable finds that variable's slots")
    opt._apply_weight_decay([mine, theirs])
    expect(float(mine.numpy()[0]) == 1.0 and abs(float(theirs.numpy()[0]) - 0.95) < 1e-6,
           "BaseOptimizer._apply_weight_decay decays the variables it is given, and only them")
    expect(_compat.uses_weight_decay(opt, theirs), "BaseOptimizer._use_weight_decay")
    opt.exclude_from_weight_decay(var_names=["theirs"])
    expect(not _compat.uses_weight_decay(opt, theirs), "exclude_from_weight_decay is read")
    half = keras.Variable(np.ones(2, "float32"), dtype="bfloat16", name="half")
    with _compat.reading_dtype(half, "float32"):
        slot = keras.optimizers.SGD().add_variable_from_reference(half, "momentum")
    expect(str(slot.dtype) == "float32" and str(half.dtype) == "bfloat16",
           "add_variable_from_reference reads the reference's dtype (KerasVariable._dtype)")


def test_an_instance_step_wrapper_is_what_fit_runs():
    model = _dense_model()
    model.compile("sgd", "mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    model.fit(x, y, verbose=0)  # traces the stock step first
    calls = []

    def wrapper(step):
        def counted(data):
            calls.append(1)
            return step(data)
        return counted

    _compat.wrap_step(model, "train_step", wrapper)
    model.fit(x, y, batch_size=4, verbose=0)
    expect(calls, "Trainer.train_step set on the instance is not what make_train_function traces")
    expect("train_step" not in type(model).__dict__, "only the instance changed")


def test_a_metric_set_as_a_model_attribute_reports_a_dict_in_the_logs():
    class Constant(keras.metrics.Metric):
        def update_state(self, *args, **kwargs):
            pass

        def reset_state(self):
            pass

        def result(self):
            return {"seven": keras.ops.convert_to_tensor(7.0)}

    model = _dense_model()
    model.compile("sgd", "mse")
    model.extra = Constant(name="constant")
    expect(model.extra in _compat.model_metrics(model), "Layer._metrics tracks metric attributes")
    history = model.fit(np.ones((4, 4)), np.ones((4, 1)), verbose=0)
    expect(history.history.get("seven") == [7.0], f"a dict metric result in the logs: {history.history}")


@pytest.mark.parametrize("kind", ["backup", "checkpoint"])
def test_suspended_saving_saves_and_deletes_nothing(tmp_path, kind):
    model = _dense_model()
    model.compile("sgd", "mse")
    callback = (keras.callbacks.BackupAndRestore(str(tmp_path / "b"), double_checkpoint=True)
                if kind == "backup" else
                keras.callbacks.ModelCheckpoint(str(tmp_path / "m{epoch}.keras")))
    x, y = np.ones((4, 4)), np.ones((4, 1))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])  # what it does unsuspended
    if kind == "backup":
        expect(not (tmp_path / "b").exists(), "BackupAndRestore deletes its backup at the end")
    else:
        expect((tmp_path / "m1.keras").exists(), "ModelCheckpoint saves every epoch")

    class Suspend(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                self.saved = _compat.suspend_saving(callback)

    suspend = Suspend()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[suspend, callback])
    if kind == "backup":
        meta = _compat.backup_files(str(tmp_path / "b")).metadata
        expect((tmp_path / "b").exists(), "delete_checkpoint=False keeps the backup")
        with open(meta) as f:
            expect(json.load(f)["epoch"] == 1, "the suspended second epoch was not saved")
    else:
        expect(not (tmp_path / "m2.keras").exists(), "the suspended epoch 2 was not saved")
    for name, value in suspend.saved.items():
        setattr(callback, name, value)
    expect(suspend.saved.get("save_freq") == "epoch", f"restored: {suspend.saved}")


def test_backup_files_and_progress_are_where_keras_keeps_them(tmp_path):
    model = _dense_model()
    model.compile("sgd", "mse")
    progress = []

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                progress.append(_compat.backup_progress(backup))
                raise RuntimeError("stop")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path), double_checkpoint=True)
    with pytest.raises(RuntimeError):
        model.fit(np.ones((4, 4)), np.ones((4, 1)), epochs=3, verbose=0, callbacks=[backup, Stop()])
    files = _compat.backup_files(str(tmp_path))
    expect(json.load(open(files.metadata))["epoch"] == 2
           and json.load(open(files.previous_metadata))["epoch"] == 1,
           "BackupAndRestore's training metadata (epochs completed) and its previous copy")
    expect(os.path.isfile(files.weights) and os.path.isfile(files.previous_weights),
           "BackupAndRestore's weights and their previous copy")
    expect(progress == [(2, 0)], f"(epochs completed, last batch) when it saves: {progress}")


def test_resume_after_epoch_makes_fit_start_there():
    model = _dense_model()
    model.compile("sgd", "mse")
    _compat.resume_after_epoch(model, 2)
    history = model.fit(np.ones((4, 4)), np.ones((4, 1)), epochs=4, verbose=0)
    expect(history.epoch == [2, 3], f"fit ran epochs {history.epoch} after resume_after_epoch(2)")


def test_symbolic_build_falls_back_to_a_local_batch_only_where_keras_fails():
    model = _dense_model()
    model.compile("sgd", "mse")
    fallbacks = []

    def stock_fails(iterator=None, data_batch=None):
        raise ValueError("Attempt to convert a value (PerReplica:{...}) to a Tensor")

    model._maybe_symbolic_build = stock_fails  # what Keras does under several workers

    def from_local(iterator):
        fallbacks.append(1)
        _compat.symbolic_build(model, _compat.first_batch(iterator))

    _compat.wrap_symbolic_build(model, from_local)
    model.fit(np.ones((8, 4), "float32"), np.ones((8, 1), "float32"), batch_size=4, verbose=0)
    expect(fallbacks == [1] and model.optimizer.built,
           "TensorFlowTrainer._maybe_symbolic_build / _symbolic_build / the epoch iterator")


# ------------------------------------------------------------------------- TensorFlow

def test_merge_call_and_multi_worker_probes():
    expect(_compat.supports_no_merge_call() is True, "the default strategy needs no merge_call")
    with mirrored().scope():
        expect(_compat.supports_no_merge_call() is False, "MirroredStrategy on CPUs uses merge_call")
    expect(not _compat.in_multi_worker_mode(mirrored()), "not a multi-worker strategy")
    expect(not _compat.in_multi_worker_mode(tf.distribute.get_strategy()), "default strategy")


def test_the_log_reduction_probe_reads_keras_trainer():
    reduces = _compat.keras_reduces_scalar_logs_along_axis_0()
    expect(isinstance(reduces, bool), "keras.src.backend.tensorflow.trainer.reduce_per_replica")
    if keras.__version__ == _compat.CHECKED_WITH:
        expect(reduces, "Keras 3.15.1 reduces scalar logs along axis 0 (keras-team/keras#20585)")


def test_a_missing_internal_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(keras.layers.Layer, "_flatten_layers")
    with pytest.raises(_compat.KerasInternalsChanged, match=rf"Layer._flatten_layers.*Keras "
                       rf"{keras.__version__}.*{_compat.CHECKED_WITH}"):
        _compat.flatten_layers(_dense_model())


def test_interpreter_ops_of_a_litert_file(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    report = tfmp.export(model, str(tmp_path / "m.tflite"), "float32")
    runner = tfmp.litert.Runner(report.path)
    ops = [op["op_name"] for op in _compat.interpreter_ops(runner._interpreter)]
    expect(ops == ["FULLY_CONNECTED"], f"Interpreter._get_ops_details: {ops}")


def test_the_export_input_signature_is_keras_own():
    inputs = keras.Input((4,), dtype="int32")
    functional = keras.Model(inputs, keras.layers.Embedding(10, 2)(inputs))
    (spec,) = _compat.export_input_signature(functional)  # one positional argument
    expect((tuple(spec.shape), keras.backend.standardize_dtype(spec.dtype)) == ((None, 4), "int32"),
           f"export_utils.get_input_signature of a Functional model: {spec}")
    subclassed = Subclassed()
    subclassed(np.zeros((2, 3), "float32"))
    (spec,) = _compat.export_input_signature(subclassed)
    expect(tuple(spec.shape) == (None, 3), f"get_input_signature of a called subclass: {spec}")


def test_traced_steps_put_back_after_they_were_forgotten_run_on():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.ones((4, 4)), np.ones((4, 2))
    model.fit(x, y, verbose=0)
    saved = _compat.traced_functions([model])
    expect([name for _, name, _ in saved] == ["train_function"], f"Trainer.train_function ({saved})")
    _compat.forget_traced_functions(model)
    _compat.restore_traced_functions(saved)
    expect(model.train_function is saved[0][2], "Trainer.train_function: set back")
    model.fit(x, y, verbose=0)  # Keras calls the function it holds: no new trace
    expect(model.train_function is saved[0][2], "Trainer.train_function: reused by fit")
