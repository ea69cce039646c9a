"""Step-time overhead of tfmp's callbacks (LossScaleMonitor + NanMonitor) in model.fit.

Two identical MLPs train side by side: one plain, one with both monitors (which
also attach the counters metric to its train step). They take turns, a block of
steps each, the order flipping every round, after warm-up; a timing callback
measures each block from its first to its last batch end (so fit's own set-up is
excluded). Prints each arm's median step time and the median of the per-round
ratios.

  python -m benchmarks.callback_overhead --rounds=30 --block=50 --precision=bf16
"""

import statistics
from typing import Callable, Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 30, "Measured rounds (one block per arm each).")
flags.DEFINE_integer("block", 50, "Steps per block.")
flags.DEFINE_integer("warmup", 3, "Unmeasured rounds first.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("width", 1024, "Hidden width of the MLP (784 -> width -> width -> 10).")
flags.DEFINE_string("precision", "bf16", "Precision policy (tfmp.set_policy names).")
flags.DEFINE_bool("calibrate", False, "A/A run: the second model gets no monitors either, "
                  "to see the method's own bias and spread.")


def main(argv: Sequence[str]) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    import tfmp

    policy = tfmp.set_policy(FLAGS.precision)

    def build() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(FLAGS.width, activation="relu"),
            keras.layers.Dense(FLAGS.width, activation="relu"),
            keras.layers.Dense(10, dtype="float32"),
        ])
        # guard=True: a DynamicLossScaleOptimizer in every precision (real counters).
        opt = tfmp.wrap_optimizer(keras.optimizers.Adam(1e-3), policy, guard=True)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    rng = np.random.RandomState(0)
    x = rng.rand(FLAGS.batch_size * 8, 784).astype("float32")
    y = rng.randint(0, 10, len(x))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat().prefetch(2)
    plain, monitored = build(), build()
    monitors = [tfmp.callbacks.LossScaleMonitor(), tfmp.callbacks.NanMonitor("stop")]

    def block(with_monitors: bool) -> Callable[[], float]:
        def run() -> float:
            timer = interleave.BlockTimer()
            model = monitored if with_monitors else plain
            callbacks = [timer] + (monitors if with_monitors and not FLAGS.calibrate else [])
            model.fit(data, epochs=1, steps_per_epoch=FLAGS.block + 1, verbose=0,
                      callbacks=callbacks)
            return timer.per_step
        return run

    times = interleave.interleaved({"plain": block(False), "monitored": block(True)},
                                   FLAGS.rounds, FLAGS.warmup)
    on, off = times["monitored"], times["plain"]
    med, q1, q3 = interleave.ratio_summary(on, off)
    if FLAGS.calibrate:
        print("CALIBRATION (A/A): neither arm has monitors")
    print(f"policy={policy} optimizer={type(monitored.optimizer).__name__} "
          f"batch={FLAGS.batch_size} width={FLAGS.width} block={FLAGS.block} rounds={FLAGS.rounds}")
    print(f"median step time, plain fit:          {1e3 * statistics.median(off):.3f} ms")
    print(f"median step time, with both monitors: {1e3 * statistics.median(on):.3f} ms")
    print(f"median per-round ratio (monitors/plain): {med:.4f} (overhead {100 * (med - 1):+.2f}%; "
          f"quartiles {q1:.4f} .. {q3:.4f})")


if __name__ == "__main__":
    app.run(main)
