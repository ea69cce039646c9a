"""prepare, convert_policy, audit and export on every model style of the corpus, checked by
running the models (the executed graph), not by reading their configs."""

import warnings

import keras
import numpy as np
import tensorflow as tf
import pytest

import tfmp
from rewrite import corpus
from tfmp.callbacks import LossScaleMonitor, NanMonitor
from tfmp.precision import HardwareInfo

GPU = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))  # float16 is no trap there; no CPU islands
HALF = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def _heavy_dtypes(run, path):
    dtypes = {op.dtype for op in run.layer(path).ops if op.flops}
    assert dtypes, f"{path} ran no matmul or convolution"
    return dtypes


def _prepare(model, policy):
    # float16 from a scale of 2^10: from 2^15 a fresh MobileNet skips its first 4 steps
    scale = {"initial_scale": 2.0**10} if policy == "mixed_float16" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tfmp.prepare(model, keras.optimizers.Adam(1e-3), policy, hardware=GPU, **scale)


@pytest.mark.parametrize("name", sorted(corpus.KINDS))
def test_prepare_computes_what_was_asked_and_trains(name):
    kind = corpus.KINDS[name]
    # MobileNet fits eagerly, ~0.7 s a step here: 1 step of 8, none skipped (the others 4)
    x, y = corpus.data(kind, n=8 if kind.inputs == "image" else 32)
    steps = len(y if kind.outputs == 1 else y[0]) // 8
    # MobileNet (~15 s for both policies) under float16 alone, the one with loss scaling: the
    # same graph converted to bfloat16 is checked by the round trip below.
    policies = {"mixed_float16": "float16"} if name == "mobilenet_v3" else HALF
    for policy, half in policies.items():
        keras.config.set_dtype_policy("float32")
        keras.utils.set_random_seed(0)
        model = kind.build()
        weights = model.get_weights()
        before = keras.tree.flatten(model(x[:4] if kind.inputs != "pair" else
                                          [a[:4] for a in x], training=False))
        prepared, opt = _prepare(model, policy)
        assert (prepared is not model) == kind.copied, policy
        for a, b in zip(weights, prepared.get_weights()):
            np.testing.assert_array_equal(a, b)
        after = keras.tree.flatten(prepared(x[:4] if kind.inputs != "pair" else
                                            [a[:4] for a in x], training=False))
        for a, b in zip(before, after):  # the same function, in 16 bits
            a = np.asarray(a, "float32")
            np.testing.assert_allclose(np.asarray(b), a, atol=0.05 * max(1.0, np.abs(a).max()))
        report = tfmp.audit(prepared, opt, hardware=GPU)  # what ran, from the traced graph
        assert report.ok, str(report)
        assert report.layer("<model>").output_dtypes == ("float32",) * kind.outputs, policy
        for path in kind.half:
            layer = report.layer(path)
            assert layer.flops and layer.half_flops == layer.flops, (policy, path)
            assert layer.output_dtypes == (half,), (policy, path)
        for path in kind.float32:
            layer = report.layer(path)
            assert layer.flops and layer.half_flops == 0, (policy, path)
        assert report.half_flops_share >= kind.min_share, (policy, report.summary())
        # below 1 exactly when some layer's matmuls stay float32 (a head, a hard-coded layer)
        assert (report.half_flops_share < 1.0) == bool(kind.float32), (policy, report.summary())
        assert report.codes() - {"size-not-aligned"} == set(kind.findings), str(report)
        prepared.compile(opt, ["sparse_categorical_crossentropy", "mse"][:kind.outputs],
                         run_eagerly=kind.eager)
        hist = prepared.fit(x, y, batch_size=8, epochs=1, verbose=0,
                            callbacks=[LossScaleMonitor(), NanMonitor("raise")])
        assert np.isfinite(hist.history["loss"][-1]), policy
        assert hist.history["skipped_steps"][-1] < steps, policy  # some steps applied
        assert any(np.any(a != b) for a, b in zip(weights, prepared.get_weights())), policy


@pytest.mark.parametrize("name", sorted(corpus.KINDS))
def test_convert_policy_round_trip_is_bit_identical(name):
    kind = corpus.KINDS[name]
    keras.utils.set_random_seed(1)
    model = kind.build()
    weights = model.get_weights()
    x = corpus.data(kind, n=2)[0]
    for policy in ("mixed_bfloat16", "mixed_float16", "float32"):
        model = tfmp.convert_policy(model, policy)
        run = tfmp.rewrite.run_model(model)
        assert run.output_dtypes == ("float32",) * kind.outputs, policy
        expected = HALF.get(policy, "float32")
        assert _heavy_dtypes(run, kind.half[0]) == {expected}, policy
        for a, b in zip(weights, model.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert all(np.isfinite(np.asarray(o)).all() for o in keras.tree.flatten(model(x)))
    assert keras.config.dtype_policy().name == "float32"  # the global policy is not touched


def test_the_audit_judges_what_a_layer_runs_not_its_name():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = corpus._norms()  # built under bfloat16: nothing in float32 yet
    report = tfmp.audit(model, hardware=GPU)
    found = {(f.code, f.path) for f in report.findings}
    assert ("normalization-half", "rescale") in found  # statistics in bfloat16, any name
    assert not any(path == "upcast" for _, path in found)  # Gemma's RMSNorm upcasts inside
    assert ("output-not-float32", "head") in found
    assert report.layer("rescale").output_dtypes == ("bfloat16",)
    hard = tfmp.audit(corpus._hardcoded(), hardware=GPU)
    assert {(f.code, f.severity, f.path) for f in hard.findings if f.code.startswith("heavy")} == {
        ("heavy-op-float32", "info", "f32_matmul")}
    assert "f32_matmul" in hard.layer_table() and "0%" in hard.layer_table()


def test_a_subclassed_model_built_in_bfloat16_gets_float32_outputs():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = corpus._subclassed()
    before = tfmp.audit(model, hardware=GPU)
    assert [(f.code, f.path) for f in before.errors] == [("output-not-float32", "head")]
    prepared, opt = _prepare(model, "mixed_bfloat16")
    assert prepared is model and model.head.compute_dtype == "float32"
    assert model(np.zeros((2, 8), "float32")).dtype == "float32"
    assert tfmp.audit(prepared, opt, hardware=GPU).ok


def test_a_config_that_does_not_round_trip_is_converted_in_place(caplog):
    model = corpus._extra_key()  # keras-hub's ViT patching layer's trouble, in a plain model
    with pytest.raises(TypeError, match="num_patches"):
        corpus.PatchEmbedding.from_config(model.get_layer("patches").get_config())
    with caplog.at_level("INFO", logger="absl"):
        converted = tfmp.convert_policy(model, "mixed_bfloat16")
    assert converted is model and model.get_layer("patches").compute_dtype == "bfloat16"
    assert "'patches' (PatchEmbedding) cannot be re-created from its config" in caplog.text


def test_a_model_whose_code_keeps_float32_is_refused_and_given_back_as_it_was():
    class AllFloat32(keras.Model):  # its only hidden matmul hard-codes float32
        def __init__(self):
            super().__init__()
            self.inner = corpus.Float32Matmul(name="inner")
            self.head = keras.layers.Dense(3, name="head")

        def call(self, x):
            return self.head(self.inner(x))

    model = AllFloat32()
    model(np.zeros((2, 8), "float32"))
    with pytest.raises(ValueError, match=r"under mixed_bfloat16 still computes every matmul and "
                       r"convolution in float32: inner run theirs in float32"):
        tfmp.convert_policy(model, "bf16")
    assert {l.dtype_policy.name for l in (model, model.inner, model.head)} == {"float32"}
    assert "call" not in vars(model)  # no output cast left behind


def test_float32_layers_a_model_cannot_take_are_left_out_and_said(caplog):
    # norm(x + ff(x)) in its own call, a plain `+`; its first norm takes the root of a sum in
    # 16 bits (so it would go float32), and its float32 output fails at the next `+`.
    model = corpus.PostNormNet(norm1=corpus.HalfStatsNorm, name="post_norm")
    model(np.zeros((2, 8), "float32"))
    with caplog.at_level("INFO", logger="absl"):
        tfmp.convert_policy(model, "bf16")
    assert "normalization statistics computed in 16 bits by norm1" in caplog.text
    assert "no layer made float32: the model fails with them (TypeError" in caplog.text
    assert model.norm2.compute_dtype == "bfloat16" and "call" in vars(model)  # the output cast
    assert model(np.zeros((2, 8), "float32")).dtype == "float32"


def test_a_model_that_cannot_run_converted_is_given_back_as_it_came():
    class RawAdd(keras.Model):  # a float32 constant added with `+`: 16 bits fail there
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4, name="dense")

        def call(self, x):
            return self.dense(x) + tf.ones((1, 4))

    model = RawAdd()
    model(np.zeros((2, 8), "float32"))
    with pytest.raises(ValueError, match=r"cannot run 'raw_add' \(RawAdd\) once converted: "):
        tfmp.convert_policy(model, "bf16")  # convert_policy itself gives it back
    assert {model.dtype_policy.name, model.dense.dtype_policy.name} == {"float32"}
    with pytest.raises(ValueError, match=r"cannot run 'raw_add' \(RawAdd\) once converted: "):
        tfmp.prepare(model, "adam", "bf16", hardware=GPU)
    assert {model.dtype_policy.name, model.dense.dtype_policy.name} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"  # prepare set it, then put it back
    assert model(np.zeros((2, 8), "float32")).dtype == "float32"


@pytest.mark.parametrize("name", ["subclassed", "extra_key_config"])
def test_compare_precision_gives_each_policy_a_model_of_its_own(name):
    kind = corpus.KINDS[name]  # both converted in place by prepare
    x, y = corpus.data(kind, n=64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    built = []

    def build():  # every model built differs: the arms must get the first one's weights
        model = kind.build()
        model.set_weights([w * (1 + len(built)) for w in model.get_weights()])
        built.append(model)
        return model

    result = tfmp.compare_precision(build, dataset, policies=("fp32", "bf16"), steps=4,
                                    hardware=GPU, tolerance=0.05)
    assert result.ok, str(result)
    assert len(built) == 2 and built[0] is not built[1]  # the reference, then one for bf16
    assert result.runs[0].losses[0] == pytest.approx(result.runs[1].losses[0], rel=0.01)
    with pytest.raises(ValueError, match=f"returned the same {type(built[0]).__name__} twice"):
        tfmp.compare_precision(lambda: built[0], dataset, steps=4, hardware=GPU)


def test_export_of_subclassed_models(tmp_path):
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = corpus._subclassed()
    x, y = corpus.data(corpus.KINDS["subclassed"], n=64)
    report = tfmp.export(model, str(tmp_path / "sub.tflite"), "float16", eval_data=(x, y))
    assert report.relative_diff < 5e-3 and report.model_policy == "mixed_bfloat16"
    assert model.block.dense.compute_dtype == "bfloat16"  # the model given was not changed
    opaque = corpus._opaque()  # no config: Keras cannot copy it into float32
    with pytest.raises(tfmp.litert.ExportError, match=r"^cannot copy 'opaque_net' \(OpaqueNet\) "
                       "in float32 for export: ") as refused:
        tfmp.export(opaque, str(tmp_path / "opaque.tflite"), "float16")
    # Keras' own message runs over 20 lines (with an example class): only its first is kept
    assert str(refused.value).endswith("for export: Object OpaqueNet was created by passing")
    # Several modes: refused before the .keras file of the first is written.
    with pytest.raises(tfmp.litert.ExportError, match=r"^cannot copy 'opaque_net'"):
        tfmp.litert.export_all(opaque, str(tmp_path), ["keras_bfloat16", "float16"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.tflite"]


def test_subclassed_models_taking_a_dict_or_integer_ids():
    class DictNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = keras.layers.Dense(8, name="a"), keras.layers.Dense(8, name="b")
            self.head = keras.layers.Dense(3, name="head")

        def call(self, inputs):
            return self.head(keras.ops.concatenate([self.a(inputs["a"]), self.b(inputs["b"])], -1))

    model = DictNet()
    model({"a": np.zeros((2, 4), "float32"), "b": np.zeros((2, 6), "float32")})
    prepared, _ = _prepare(model, "mixed_bfloat16")  # traced on the dict of shapes it was built on
    run = tfmp.rewrite.run_model(prepared)
    assert run.input_shapes == ((2, 4), (2, 6)) and run.output_dtypes == ("float32",)
    assert _heavy_dtypes(run, "a") == {"bfloat16"}

    class Tokens(keras.Model):
        def __init__(self):
            super().__init__()
            self.embed = keras.layers.Embedding(50, 8, name="embed")
            self.mix = keras.layers.Dense(8, name="mix")
            self.head = keras.layers.Dense(3, name="head")

        def call(self, ids):
            return self.head(keras.ops.mean(self.mix(self.embed(ids)), axis=1))

    ids = np.random.RandomState(0).randint(0, 50, (4, 6)).astype("int32")
    tokens = Tokens()
    tokens(ids)
    prepared, opt = tfmp.prepare(tokens, "adam", "bf16", hardware=GPU, data=ids)
    run = tfmp.rewrite.run_model(prepared, ids)
    assert run.input_shapes == ((4, 6),) and _heavy_dtypes(run, "mix") == {"bfloat16"}
    assert prepared(ids).dtype == "float32"
