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
from typing import Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
interleave.define_flags(rounds=30, block=50, batch_size=256)
flags.DEFINE_integer("width", 1024, "Hidden width of the MLP (784 -> width -> width -> 10).")
flags.DEFINE_bool("calibrate", False, "A/A run: the second model gets no monitors either, "
                  "to see the method's own bias and spread.")


def main(argv: Sequence[str]) -> None:
    import keras
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

    data = interleave.random_batches(784, FLAGS.batch_size)
    plain, monitored = build(), build()
    monitors = [tfmp.callbacks.LossScaleMonitor(), tfmp.callbacks.NanMonitor("stop")]
    clock = interleave.CLOCKS[FLAGS.clock]
    blocks = {"plain": interleave.fit_block(plain, data, FLAGS.block, clock),
              "monitored": interleave.fit_block(monitored, data, FLAGS.block, clock,
                                                [] if FLAGS.calibrate else monitors)}
    times = interleave.interleaved(blocks, FLAGS.rounds, FLAGS.warmup)
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
