"""Input pipelines for the reference models: a learnable synthetic task, or tfds.

Pipelines stay float32 (token ids int32) on the host; casting to the compute
dtype happens in the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tfmp._messages import first_line
from tfmp.rewrite.tracing import first_input_spec

INPUT_KINDS = ("vector", "image", "tokens")
SYNTHETIC = "synthetic"
# Synthetic task sizes (deterministic for a seed; small enough for CI).
VECTOR_DIM, IMAGE_SHAPE, SEQ_LEN, VOCAB = 64, (32, 32, 3), 64, 1000
TEXT_SAMPLE_FOR_VOCAB = 2000


class DatasetError(ValueError):
    """A dataset that cannot be used: unknown, not prepared, or the wrong kind."""


@dataclasses.dataclass(frozen=True)
class Data:
    """Batched train (repeating) and eval pipelines plus what the model needs to know.

    Attributes:
        train: Infinite, batched `tf.data.Dataset` of `(inputs, label)` or
            `(inputs, label, sample_weight)`.
        eval: Finite, batched eval dataset, or None (no evaluation).
        input_shape: Shape of one example (None: inputs that are not one tensor).
        num_classes: Number of classes (None: not known from the data).
        vocab_size: Token vocabulary (token inputs only).
        train_examples: Examples in one pass over the training split (None: not known).
        name: Dataset name.
        steps_per_pass: Batches in one pass (default: `train_examples // batch size`).
        per_worker: In a multi-worker run, the training dataset of one worker from its
            `tf.distribute.InputContext` (a user's data function that shards); else None.
    """

    train: tf.data.Dataset
    eval: Optional[tf.data.Dataset]
    input_shape: Optional[tuple[int, ...]]
    num_classes: Optional[int]
    vocab_size: Optional[int]
    train_examples: Optional[int]
    name: str
    steps_per_pass: Optional[int] = None
    per_worker: Optional[Callable[[tf.distribute.InputContext], tf.data.Dataset]] = None

    def model_kwargs(self) -> dict[str, Any]:
        """What a reference model is built with: the data's shape and classes (where known)."""
        kwargs = {"input_shape": self.input_shape, "num_classes": self.num_classes,
                  "vocab_size": self.vocab_size}
        return {k: v for k, v in kwargs.items() if v is not None}

    def steps(self, batch_size: int) -> Optional[int]:
        """Batches in one pass over the training data, or None when not known."""
        if self.steps_per_pass is not None:
            return self.steps_per_pass
        return max(self.train_examples // batch_size, 1) if self.train_examples else None


def synthetic_arrays(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`(x, y, num_classes)` of a learnable task: labels are a fixed function of x.

    - vector: x ~ N(0, 1)^64, y = argmax(x @ W) over 10 classes (W fixed).
    - image: 32x32x3 in [0, 1], a class template (10 fixed patterns) plus noise.
    - tokens: 64 ids < 1000, y = 1 if most ids are below 500 (2 classes).
    The task itself (W, templates) is fixed; `seed` only draws the examples.
    """
    task = np.random.RandomState(1234)
    rng = np.random.RandomState(seed)
    if kind == "vector":
        w = task.normal(size=(VECTOR_DIM, 10)).astype("float32")
        x = rng.normal(size=(n, VECTOR_DIM)).astype("float32")
        return x, np.argmax(x @ w, axis=1).astype("int32"), 10
    if kind == "image":
        templates = task.uniform(size=(10, *IMAGE_SHAPE)).astype("float32")
        y = rng.randint(0, 10, n).astype("int32")
        noise = rng.uniform(size=(n, *IMAGE_SHAPE)).astype("float32")
        return 0.6 * templates[y] + 0.4 * noise, y, 10
    if kind == "tokens":
        x = rng.randint(0, VOCAB, size=(n, SEQ_LEN)).astype("int32")
        return x, ((x < VOCAB // 2).sum(axis=1) > SEQ_LEN // 2).astype("int32"), 2
    raise ValueError(f"Unknown input kind {kind!r}; accepted: {', '.join(INPUT_KINDS)}.")


def _first_input(model: Any) -> Any:
    """The `tf.TensorSpec` of a model's first input (of any model kind: from its Input, or
    from the shape a subclassed model was built with)."""
    try:
        return first_input_spec(model)
    except (ValueError, TypeError) as e:
        raise DatasetError(str(e)) from None


def input_kind(model: Any) -> str:
    """The kind of input a model's first input takes: `tokens` (integers), `image` (rank 4)
    or `vector`, for a model whose own builder is not at hand (a saved `.keras` file)."""
    spec = _first_input(model)
    if spec.dtype.is_integer:
        return "tokens"
    return "image" if len(spec.shape) == 4 else "vector"


def check_fits(model: Any, data: "Data") -> None:
    """Raises `DatasetError` when `data`'s examples do not have the model's input shape."""
    expected = tuple(_first_input(model).shape[1:])
    if data.input_shape is not None and tuple(data.input_shape) != expected:
        raise DatasetError(f"the model takes inputs of shape {expected}; dataset {data.name!r} "
                           f"has {tuple(data.input_shape)}: give a dataset that fits the model")


SHUFFLE_BLOCK = 4096


def shuffled_passes(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """Endless passes over `ds`, each shuffled in blocks of `SHUFFLE_BLOCK` examples.

    The order of pass p, block b is drawn from `(seed, p, b)` alone (stateless), never
    from how many iterators were made before: `shuffle(reshuffle_each_iteration=True)`
    carries its seeds over from one iterator of a dataset to the next, and Keras makes
    more than one. So a resumed run that skips the batches it already trained on sees
    exactly the batches an uninterrupted run sees.
    """

    def one_pass(p):
        def shuffle_block(b, block):
            n = tf.shape(tf.nest.flatten(block)[0])[0]
            key = tf.stack([tf.constant(seed, tf.int64), p * 1_000_003 + b])
            order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=key)
            return tf.data.Dataset.from_tensor_slices(
                tf.nest.map_structure(lambda t: tf.gather(t, order), block))

        return ds.batch(SHUFFLE_BLOCK).enumerate().flat_map(shuffle_block)

    return tf.data.Dataset.counter().flat_map(one_pass)


def batched(ds: tf.data.Dataset, batch_size: int, train: bool = False,
            seed: int = 0) -> tf.data.Dataset:
    """Examples in batches of `batch_size`: for training, endless shuffled passes
    (`shuffled_passes`) in whole batches."""
    if train:
        ds = shuffled_passes(ds, seed)
    # drop_remainder: static shapes (TPU) and even splits across replicas.
    return ds.batch(batch_size, drop_remainder=train).prefetch(tf.data.AUTOTUNE)


def synthetic(kind: str, batch_size: int, seed: int = 0, train_examples: int = 8192,
              eval_examples: int = 1024) -> Data:
    """The synthetic task for a model's input kind, as `Data`."""
    x, y, classes = synthetic_arrays(kind, train_examples, seed)
    ex, ey, _ = synthetic_arrays(kind, eval_examples, seed + 1)
    train = batched(tf.data.Dataset.from_tensor_slices((x, y)), batch_size, True, seed)
    ev = batched(tf.data.Dataset.from_tensor_slices((ex, ey)), batch_size, False, seed)
    return Data(train, ev, x.shape[1:], classes, VOCAB if kind == "tokens" else None,
                train_examples, SYNTHETIC)


def _prepare_hint(name: str, data_dir: Optional[str]) -> str:
    where = f"data_dir={data_dir!r}" if data_dir else "the default data_dir (~/tensorflow_datasets)"
    return (f"dataset {name!r} is not prepared in {where}; on a machine with network run "
            f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir='{data_dir or '~/tensorflow_datasets'}').download_and_prepare()\" "
            "and copy that directory here (this machine cannot download)")


def _load_split(name: str, split: str, data_dir: Optional[str]):
    import tensorflow_datasets as tfds

    return tfds.load(name, split=split, data_dir=data_dir, as_supervised=True,
                     with_info=True, download=False, try_gcs=False)


def _tfds(name: str, data_dir: Optional[str], train_split: str = "train",
          eval_split: Optional[str] = None):
    """(train, eval, info) from tfds, or `DatasetError` with one clear line. Without
    `eval_split`: `test`, else `validation`, else 1000 examples held out of the training split."""
    import tensorflow_datasets as tfds

    if name not in tfds.list_builders(with_community_datasets=False):
        raise DatasetError(f"unknown dataset {name!r}: use 'synthetic' or a tensorflow-datasets "
                           "name (e.g. mnist, cifar10, imdb_reviews)")
    try:
        train, info = _load_split(name, train_split, data_dir)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError, FileNotFoundError):
        raise DatasetError(_prepare_hint(name, data_dir)) from None
    except (ValueError, KeyError) as e:  # a split it does not have, or bad split syntax
        raise DatasetError(_split_error("train_split", train_split, name, _info_of(name, data_dir),
                                        e)) from None
    if eval_split:
        try:
            return train, _load_split(name, eval_split, data_dir)[0], info
        except (AssertionError, ValueError, KeyError, FileNotFoundError) as e:
            raise DatasetError(_split_error("eval_split", eval_split, name, info, e)) from None
    for split in ("test", "validation"):
        try:
            return train, _load_split(name, split, data_dir)[0], info
        except (AssertionError, ValueError, KeyError, FileNotFoundError):
            continue
    return train.skip(1000), train.take(1000), info  # no eval split: hold out 1000


def _info_of(name: str, data_dir: Optional[str]) -> Any:
    """A prepared dataset's `DatasetInfo` (None if it cannot be read)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir).info
    except Exception:  # noqa: BLE001 (only for a message)
        return None


def _split_error(flag: str, split: str, name: str, info: Any, error: Exception) -> str:
    have = f" (it has {', '.join(info.splits)})" if info is not None and info.splits else ""
    return (f"--{flag}={split!r} is not a split of {name}{have}: give a split name or a "
            f"slice such as 'train[:90%]' ({first_line(error)})")


def _image_preprocess(kind: str):
    def fn(image, label):
        image = tf.cast(image, tf.float32) / 255.0
        if kind == "image":
            if image.shape[-1] == 1:
                image = tf.image.grayscale_to_rgb(image)
            image = tf.image.resize(image, IMAGE_SHAPE[:2])
        else:
            image = tf.reshape(image, [-1])
        return image, label

    return fn


def from_tfds(name: str, kind: str, batch_size: int, data_dir: Optional[str] = None,
              seed: int = 0, splits: tuple[str, Optional[str]] = ("train", None)) -> Data:
    """A tensorflow-datasets dataset preprocessed for a model's input kind.

    Images become float32 in [0, 1] (resized to 32x32 RGB for `image`,
    flattened for `vector`); text becomes int32 token ids (a `TextVectorization`
    vocabulary of 1000 adapted on the first 2000 training texts, 64 tokens).

    Raises:
        DatasetError: unknown name, not prepared in `data_dir` (no download is
            attempted), or features that do not fit `kind`.
    """
    train, ev, info = _tfds(name, data_dir, *splits)
    feature_dtype = train.element_spec[0].dtype
    is_text = feature_dtype == tf.string
    if is_text != (kind == "tokens"):
        what = "text" if is_text else "images"
        raise DatasetError(f"dataset {name!r} has {what}, which a {kind!r}-input model cannot "
                           "take (transformer: text; mlp, cnn: images)")
    if is_text:
        vectorizer = keras.layers.TextVectorization(max_tokens=VOCAB,
                                                    output_sequence_length=SEQ_LEN)
        vectorizer.adapt(train.map(lambda t, _: t).take(TEXT_SAMPLE_FOR_VOCAB).batch(256))
        fn = lambda t, y: (tf.cast(vectorizer(t), tf.int32), y)  # noqa: E731
    else:
        fn = _image_preprocess(kind)
    train = train.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ev = ev.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    input_shape = tuple(train.element_spec[0].shape)
    classes = info.features["label"].num_classes
    examples = int(train.cardinality())  # known for tfds splits; -1/-2 if not
    if examples < 0 and "train" in info.splits:
        examples = info.splits["train"].num_examples
    return Data(batched(train, batch_size, True, seed), batched(ev, batch_size, False, seed),
                input_shape, classes, VOCAB if is_text else None, examples, name)


def load(dataset: str, kind: str, batch_size: int, data_dir: Optional[str] = None,
         seed: int = 0, splits: tuple[str, Optional[str]] = ("train", None)) -> Data:
    """`synthetic` or a tensorflow-datasets name (its `(train, eval)` splits), batched with the
    global `batch_size`."""
    if dataset == SYNTHETIC:
        return synthetic(kind, batch_size, seed)
    return from_tfds(dataset, kind, batch_size, data_dir, seed, splits)
