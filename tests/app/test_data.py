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


def test_tfds_splits_are_chosen_and_a_bad_one_is_one_line(tmp_path):
    """A dataset really prepared on disk (tensorflow-datasets' mock data ignores splits)."""

    class TinyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 1)),
                "label": tfds.features.ClassLabel(num_classes=3)}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(40)),
                    "test": self._generate_examples(range(100, 108))}

        def _generate_examples(self, pixels):
            for i in pixels:  # every pixel of example i is i: it names the example
                yield i, {"image": np.full((4, 4, 1), i, "uint8"), "label": i % 3}

    TinyDigits(data_dir=str(tmp_path)).download_and_prepare()
    d = data.load("tiny_digits", "vector", 4, str(tmp_path), splits=("train[:50%]", "train[50%:]"))
    def examples(ds):
        return [round(float(x[0]) * 255) for batch, *_ in ds for x in batch.numpy()]

    assert d.train_examples == 20
    train_half, eval_half = set(examples(d.train.take(5))), examples(d.eval)
    assert len(eval_half) == 20 and max(eval_half) < 40  # of train, not of test
    assert not train_half & set(eval_half)  # the other half
    default = data.load("tiny_digits", "vector", 4, str(tmp_path))
    assert default.train_examples == 40 and sum(len(y) for _, y in default.eval) == 8  # test
    for splits, flag in ((("trian", None), "train_split"), (("train", "tset"), "eval_split")):
        with pytest.raises(data.DatasetError) as err:
            data.load("tiny_digits", "vector", 4, str(tmp_path), splits=splits)
        message = str(err.value)
        assert message.startswith(f"--{flag}='{splits[flag == 'eval_split']}' is not a split of "
                                  "tiny_digits (it has ") and "\n" not in message, message
