"""Step-time cost of the NaN guard (`tfmp.wrap_optimizer(..., guard=True)`) in model.fit.

tools/train trains every precision through a guarded DynamicLossScaleOptimizer
(a fixed scale of 1 under bf16 / float32) so that a non-finite step is skipped,
never applied. This measures what that costs against the plain optimizer on the
default reference MLP: two identical models take turns in short blocks
(benchmarks/interleave.py) and the median per-round speed ratio is printed.

  python -m benchmarks.guard_overhead --rounds=20 --block=40 --clock=cpu
"""

import statistics
import time
from typing import Callable, Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 20, "Measured rounds (one block per arm each).")
flags.DEFINE_integer("block", 40, "Steps per block.")
flags.DEFINE_integer("warmup", 3, "Unmeasured rounds first.")
flags.DEFINE_integer("batch_size", 128, "Batch size (tools/train's default).")
flags.DEFINE_string("precision", "bf16", "Precision policy (tfmp.set_policy names).")
flags.DEFINE_enum("clock", "wall", ("wall", "cpu"), "wall: perf_counter; cpu: process CPU "
                  "seconds (immune to the machine's stalls).")


def main(argv: Sequence[str]) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    import models
    import tfmp

    policy = tfmp.set_policy(FLAGS.precision)
    clock = time.process_time if FLAGS.clock == "cpu" else time.perf_counter

    def build(guard: bool) -> keras.Model:
        keras.utils.set_random_seed(0)
        model = models.get("mlp")[0]()  # 64 -> 256 -> 256 -> 10
        opt = tfmp.wrap_optimizer(keras.optimizers.Adam(1e-3), policy, guard=guard)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    rng = np.random.RandomState(0)
    x = rng.rand(FLAGS.batch_size * 8, 64).astype("float32")
    y = rng.randint(0, 10, len(x))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat().prefetch(2)
    arms = {"plain": build(False), "guard": build(True)}

    def block(name: str) -> Callable[[], float]:
        def run() -> float:
            timer = interleave.BlockTimer(clock)
            arms[name].fit(data, epochs=1, steps_per_epoch=FLAGS.block + 1, verbose=0,
                           callbacks=[timer])
            return timer.per_step
        return run

    times = interleave.interleaved({name: block(name) for name in arms}, FLAGS.rounds,
                                   FLAGS.warmup)
    speed, q1, q3 = interleave.ratio_summary(times["plain"], times["guard"])
    print(f"policy={policy} model=mlp (default) batch={FLAGS.batch_size} block={FLAGS.block} "
          f"rounds={FLAGS.rounds} clock={FLAGS.clock}")
    print(f"median step time, plain optimizer:   {1e3 * statistics.median(times['plain']):.3f} ms")
    print(f"median step time, guarded optimizer: {1e3 * statistics.median(times['guard']):.3f} ms")
    print(f"guarded speed as a share of plain: {speed:.3f} (quartiles {q1:.3f} .. {q3:.3f})")


if __name__ == "__main__":
    app.run(main)
