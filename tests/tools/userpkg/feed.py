"""The user's data: a learnable task (the label is argmax(x @ W)), as arrays and as
tf.data functions called with the global batch size (and, in a multi-worker run, the input
context: each worker keeps its own shard)."""

import json
import os

import numpy as np
import tensorflow as tf

from userpkg.nets import CLASSES, FEATURES


def arrays(n, seed=0):
    w = np.random.RandomState(99).normal(size=(FEATURES, CLASSES))
    x = np.random.RandomState(seed).normal(size=(n, FEATURES)).astype("float32")
    return x, np.argmax(x @ w, axis=1).astype("int32")


def write_npz(path, n=512, eval_n=0, **extra):
    x, y = arrays(n)
    more = dict(zip(("x_eval", "y_eval"), arrays(eval_n, seed=1))) if eval_n else {}
    np.savez(path, x=x, y=y, **more, **extra)


def _record_shard(train, input_context, batch_size):
    """The shard `input_context` gives (its first example) and the per-replica batch, in
    $USERPKG_SHARDS/<pipeline>.json when that is set (overwritten by a later call)."""
    if "USERPKG_SHARDS" not in os.environ:
        return
    record = os.path.join(os.environ["USERPKG_SHARDS"], f"{input_context.input_pipeline_id}.json")
    with open(record, "w") as f:
        json.dump({"pipelines": input_context.num_input_pipelines, "batch": batch_size,
                   "first_x": float(next(iter(train))[0][0])}, f)


def _shard(batch_size, input_context):
    """1024 examples, and the batch size; with an input context, its shard (recorded) and
    the per-replica batch size."""
    train = tf.data.Dataset.from_tensor_slices(arrays(1024))
    if input_context is not None:
        train = train.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        _record_shard(train, input_context, batch_size)
    return train, batch_size


def make(batch_size, input_context=None):
    """(train, eval), batched; sharded by the input context when there is one (its shard
    and the per-replica batch recorded in $USERPKG_SHARDS/<pipeline>.json)."""
    train, batch_size = _shard(batch_size, input_context)
    ex, ey = arrays(256, seed=1)
    evaluation = tf.data.Dataset.from_tensor_slices((ex, ey)).batch(batch_size)
    return train.shuffle(1024, seed=0).batch(batch_size, drop_remainder=True), evaluation


def weighted(batch_size, weight=0.0):
    """(x, y, sample_weight) batches, every weight `weight`; no evaluation data. Batches of 16
    whatever `batch_size` is: a function that batches on its own."""
    x, y = arrays(512)
    w = np.full(len(x), weight, "float32")
    return tf.data.Dataset.from_tensor_slices((x, y, w)).batch(16, drop_remainder=True)


def endless(batch_size):
    return tf.data.Dataset.from_tensor_slices(arrays(512)).repeat().batch(batch_size)


def unbatched(batch_size):
    return tf.data.Dataset.from_tensor_slices(arrays(512))


def not_a_dataset(batch_size):
    return [1, 2, 3]


def loud(batch_size):
    """Inputs 20000 times larger: the hidden layer's outputs pass float16's 65504."""
    x, y = arrays(512)
    return tf.data.Dataset.from_tensor_slices((x * 2e4, y)).batch(batch_size, drop_remainder=True)


def empty_eval(batch_size):
    train, evaluation = make(batch_size)
    return train, evaluation.take(0)


def two_targets(batch_size):
    x, y = arrays(512)
    targets = {"a": y, "b": x.sum(axis=1, keepdims=True)}
    return tf.data.Dataset.from_tensor_slices((x, targets)).batch(batch_size, drop_remainder=True)


def make_resumable(batch_size, input_context=None):
    """`make`'s training data in an order drawn from the seed and the pass alone
    (tfmp.app.data.shuffled_passes: endless, so give --steps_per_epoch), which a resumed
    run replays exactly; with an input context, its shard (taken before the passes are
    shuffled) batched per replica, recorded as `make` records it."""
    from tfmp.app.data import shuffled_passes

    train, batch_size = _shard(batch_size, input_context)
    return shuffled_passes(train, seed=0).batch(batch_size, drop_remainder=True)
