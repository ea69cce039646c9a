"""Each reference model builds and trains under each policy with the loss falling."""

import warnings

import keras
import numpy as np
import pytest

import models
import tfmp
from tfmp.app import data
from tfmp.precision import HardwareInfo

GPU = HardwareInfo("gpu", ("GPU:0",), ((8, 0),))  # no trap warnings for fp16 here
SMALL = {"mlp": {"hidden": (64,)}, "cnn": {"width": 8, "stages": 2},
         "transformer": {"dim": 32, "heads": 2, "depth": 1}}


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_model_trains_under_policy(name, policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tfmp.set_policy(policy, hardware=GPU)
    build, kind = models.get(name)
    x, y, classes = data.synthetic_arrays(kind, 128, seed=0)
    keras.utils.set_random_seed(0)
    model = build(input_shape=x.shape[1:], num_classes=classes,
                  vocab_size=1000 if kind == "tokens" else None, **SMALL[name])
    assert model.outputs[0].dtype == "float32"
    report = tfmp.audit(model, tfmp.wrap_optimizer(keras.optimizers.Adam(3e-3)), hardware=GPU)
    assert report.findings == (), str(report)
    # What tools/train runs: prepare (its normalization layers keep the 16-bit policy, their
    # statistics float32 inside) and the guarded optimizer.
    model, opt = tfmp.prepare(model, keras.optimizers.Adam(3e-3), policy, hardware=GPU, guard=True)
    norms = [l for l in model.layers if "Norm" in type(l).__name__]
    compute = keras.dtype_policies.get(policy).compute_dtype
    assert all(l.compute_dtype == compute for l in norms), [(l.name, l.compute_dtype) for l in norms]
    moving = [v for l in norms for v in l.non_trainable_weights]  # BatchNorm's statistics
    assert all(v.dtype == "float32" for v in moving)
    start = [v.numpy() for v in moving]
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    losses = hist.history["loss"]
    assert losses[-1] < losses[0], losses
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert all(np.any(v.numpy() != s) for v, s in zip(moving, start))  # they moved
    assert (len(moving) > 0) == (name == "cnn")


def test_registry_errors_and_transformer_args():
    with pytest.raises(ValueError, match="'vit'.*mlp, cnn, transformer"):
        models.get("vit")
    with pytest.raises(ValueError, match="dim=30 must be a multiple of heads=4"):
        models.get("transformer")[0](dim=30, heads=4)


def test_models_round_trip_through_keras_files(tmp_path):
    keras.config.set_dtype_policy("mixed_bfloat16")
    for name, (build, kind) in models.REGISTRY.items():
        x, _, classes = data.synthetic_arrays(kind, 4, seed=0)
        model = build(input_shape=x.shape[1:], num_classes=classes, **SMALL[name])
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
