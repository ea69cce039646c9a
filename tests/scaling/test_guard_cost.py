"""What the guard adds to a traced train step: counted on the graph, not timed."""

import collections

import keras
import tensorflow as tf

import tfmp

VOCAB = 5000


def _op_counts(optimizer):
    """Op types of one traced train step (its nested functions included) of a small model with
    an embedding (a sparse gradient) and two dense layers."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(VOCAB, 8),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(8),
                              keras.layers.Dense(2)])
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):  # Keras' TensorFlow train step: scaled loss, gradients, apply
        with tf.GradientTape() as tape:
            scaled = optimizer.scale_loss(loss_fn(y, model(x, training=True)))
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)

    graph = step.get_concrete_function(tf.TensorSpec((4, 6), tf.int32),
                                       tf.TensorSpec((4,), tf.int32)).graph.as_graph_def()
    counts = collections.Counter(node.op for node in graph.node)
    for function in graph.library.function:
        counts.update(node.op for node in function.node_def)
    return counts, len(model.trainable_variables)


def test_the_guard_checks_each_gradient_once_and_never_densifies_a_sparse_one():
    plain, variables = _op_counts(keras.optimizers.Adam())
    guarded, _ = _op_counts(tfmp.wrap_optimizer(keras.optimizers.Adam(), "float32", guard=True))
    # The embedding's gradient is IndexedSlices: checked on its values, not scattered into a
    # VOCAB x 8 dense tensor first (what summing it whole does).
    dense = ("UnsortedSegmentSum", "ScatterNd", "TensorScatterAdd", "TensorScatterUpdate")
    assert [guarded[op] for op in dense] == [plain[op] for op in dense], guarded
    # One sum per gradient and one over their sums: the finiteness check of every step.
    assert guarded["Sum"] - plain["Sum"] <= variables + 1, (guarded["Sum"], plain["Sum"])
    assert guarded["If"] - plain["If"] <= 1  # one conditional around the whole update


def test_a_sparse_gradient_is_checked_on_its_values():
    from tfmp.scaling import numerics

    rows = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    for bad, finite in ((None, True), (float("nan"), False), (float("inf"), False)):
        values = rows if bad is None else tf.tensor_scatter_nd_update(rows, [[1, 0]], [bad])
        sparse = tf.IndexedSlices(values, tf.constant([3, 7]), tf.constant([VOCAB, 2]))
        assert bool(numerics.all_finite([tf.ones((2,)), sparse])) is finite, bad
        assert int(numerics.first_nonfinite([tf.ones((2,)), sparse], [0, 1], 2)) == (
            2 if finite else 1), bad
