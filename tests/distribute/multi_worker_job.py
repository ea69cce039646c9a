"""One worker of the two-worker tests (tests/distribute/test_multi_worker.py starts two, each with its TF_CONFIG).

A tiny regression model built under MultiWorkerMirroredStrategy, set up by
tfmp.prepare, trained with plain `model.fit`. Each worker reads its own data
(auto-sharding off; 16 rows per worker and step); with `inject`, one step of worker 1 is
large enough that its float16 gradients overflow (the other worker's are clean).
With `weights`, a
bfloat16 variable is created and the error it raises recorded. With `nofix`, tfmp's multi-worker fit fix is off (`TFMP_MULTI_WORKER_FIX=off`) and the
error Keras' `fit` raises is recorded instead of the final state (put it last).
Each SCENARIO (`PRECISION[+inject][+accum][+weights][+nofix]`) trains a model of its own, one after the other
in the same processes and cluster (one launch, TensorFlow started once per worker), and
writes its final state to OUT/<SCENARIO>/worker<i>.json.

  python tests/multi_worker_job.py OUT [single] SCENARIO [SCENARIO ...]
"""

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import tfmp
from tfmp import distribute

out, *scenarios = sys.argv[1:]
single = scenarios[0] == "single"  # one process, no cluster: both workers' rows in each batch
scenarios = scenarios[1:] if single else scenarios
index = 0 if single else distribute.cluster.read_tf_config().task_index
strategy = tf.distribute.get_strategy() if single else distribute.connect(60)


def pipeline(x):
    ds = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1, keepdims=True))).batch(32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def bfloat16_variable_error():
    """What creating a bfloat16 variable under the strategy raises (None if it works)."""
    try:
        with strategy.scope():
            keras.Variable(np.ones((4,), "float32"), dtype="bfloat16")
        return None
    except Exception as e:  # noqa: BLE001 (recorded for the test)
        return f"{type(e).__name__}: {e}"


def prepare_error():
    """What tfmp.prepare(..., weights_dtype="bfloat16") raises under the strategy."""
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        try:
            tfmp.prepare(model, "adam", "bf16", weights_dtype="bfloat16")
            return None
        except Exception as e:  # noqa: BLE001 (recorded for the test)
            return f"{type(e).__name__}: {e}"


def train(scenario):
    precision, *options = scenario.split("+")
    if "weights" in options:  # 16-bit weights: can the cluster hold them at all?
        os.makedirs(os.path.join(out, scenario), exist_ok=True)
        with open(os.path.join(out, scenario, f"worker{index}.json"), "w") as f:
            json.dump({"error": bfloat16_variable_error(), "prepare": prepare_error()}, f)
        return
    if "nofix" in options:
        os.environ["TFMP_MULTI_WORKER_FIX"] = "off"
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1)])
        accum = 2 if "accum" in options else None
        model, opt = tfmp.prepare(
            model, keras.optimizers.Adam(1e-2, gradient_accumulation_steps=accum), precision,
            guard=True)
        model.compile(opt, "mse")
    x = np.random.RandomState(index).rand(128, 8).astype("float32")
    if single:  # step k of the cluster: rows 16k..16k+16 of worker 0's data, then of worker 1's
        other = np.random.RandomState(1).rand(128, 8).astype("float32")
        x = np.stack([x.reshape(8, 16, 8), other.reshape(8, 16, 8)], 1).reshape(256, 8)
    first = x.copy()
    if "inject" in options and index == 1:
        first[64:80] *= 300.0  # one step of this worker: scaled gradients beyond float16's 65504
    data = pipeline(first).concatenate(pipeline(x).repeat())  # 32 rows: 16 per worker and step
    os.makedirs(os.path.join(out, scenario), exist_ok=True)
    if "nofix" in options:  # upstream's failure, recorded
        try:
            model.fit(data, epochs=3, steps_per_epoch=4, verbose=0)
            error = None
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, scenario, f"worker{index}.json"), "w") as f:
            json.dump({"error": error}, f)
        return
    history = model.fit(data, epochs=3, steps_per_epoch=4, verbose=0)
    with open(os.path.join(out, scenario, f"worker{index}.json"), "w") as f:
        json.dump({"loss": history.history["loss"], "loss_scale": opt.loss_scale,
                   "skipped_steps": int(opt.skipped_steps.numpy()),
                   "iterations": int(opt.iterations.numpy()),
                   "weights": [w.tolist() for w in model.get_weights()]}, f)


for scenario in scenarios:
    train(scenario)
