"""Synthetic tasks and the tensorflow-datasets path (through tfds.testing.mock_data)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfmp.app import data


@pytest.mark.parametrize("kind, shape, dtype, classes", [
    ("vector", (64,), tf.float32, 10), ("image", (32, 32, 3), tf.float32, 10),
    ("tokens", (64,), tf.int32, 2)])
def test_synthetic_shapes_and_host_dtypes(kind, shape, dtype, classes):
    d = data.synthetic(kind, batch_size=32, train_examples=256, eval_examples=64)
    x, y = next(iter(d.train))
    assert x.shape == (32, *shape) and x.dtype == dtype
    assert (d.input_shape, d.num_classes) == (shape, classes)
    assert d.model_kwargs().get("vocab_size") == (1000 if kind == "tokens" else None)
    assert sum(int(b[0].shape[0]) for b in d.eval) == 64


@pytest.mark.parametrize("kind", ["vector", "image", "tokens"])
def test_synthetic_is_deterministic_and_labels_are_a_function_of_inputs(kind):
    x1, y1, _ = data.synthetic_arrays(kind, 128, seed=3)
    x2, y2, _ = data.synthetic_arrays(kind, 128, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, y3, _ = data.synthetic_arrays(kind, 128, seed=4)
    assert not np.array_equal(x1, x3)
    # Same input -> same label across draws: the task is fixed, only the draw changes.
    xa, ya, _ = data.synthetic_arrays(kind, 512, seed=5)
    assert len(np.unique(ya)) > 1
    assert np.mean(ya == np.bincount(ya).argmax()) < 0.9  # not a constant


def test_unknown_and_unprepared_datasets(tmp_path):
    with pytest.raises(data.DatasetError, match="unknown dataset 'no_such_ds'"):
        data.load("no_such_ds", "image", 32, str(tmp_path))
    with pytest.raises(data.DatasetError) as err:
        data.load("mnist", "image", 32, str(tmp_path))
    message = str(err.value)
    assert "'mnist' is not prepared" in message and "download_and_prepare" in message
    assert "\n" not in message


def test_tfds_images_for_cnn_and_mlp():
    with tfds.testing.mock_data(num_examples=64):
        cnn = data.load("mnist", "image", 16)
        x, y = next(iter(cnn.train))
        assert x.shape == (16, 32, 32, 3) and x.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
        assert cnn.num_classes == 10 and cnn.train_examples == 64
        mlp = data.load("cifar10", "vector", 16)
        assert mlp.input_shape == (32 * 32 * 3,)


def test_tfds_text_for_transformer_and_kind_mismatch():
    with tfds.testing.mock_data(num_examples=64):
        d = data.load("imdb_reviews", "tokens", 8)
        x, _ = next(iter(d.train))
        assert x.shape == (8, 64) and x.dtype == tf.int32
        assert d.num_classes == 2 and d.vocab_size == 1000
        with pytest.raises(data.DatasetError, match="has text"):
            data.load("imdb_reviews", "image", 8)
        with pytest.raises(data.DatasetError, match="has images"):
            data.load("mnist", "tokens", 8)


def test_shuffled_passes_depend_on_seed_and_pass_only():
    # Keras makes several iterators over a training set; a resumed run skips what it
    # trained on. Both only line up when the order is a function of (seed, pass).
    ds = tf.data.Dataset.range(10)
    passes = data.shuffled_passes(ds, seed=3)
    first = list(passes.take(30).as_numpy_iterator())
    assert list(passes.take(30).as_numpy_iterator()) == first  # a second iterator: same order
    assert list(passes.skip(17).take(13).as_numpy_iterator()) == first[17:]
    for k in range(3):  # every pass is a permutation of the data, and they differ
        assert sorted(first[10 * k:10 * k + 10]) == list(range(10))
    assert first[:10] != first[10:20] and first[:10] != list(range(10))
    assert list(data.shuffled_passes(ds, seed=4).take(10).as_numpy_iterator()) != first[:10]
