"""Step-time cost of the NaN guard (`tfmp.wrap_optimizer(..., guard=True)`) in model.fit.

tools/train trains every precision through a guarded DynamicLossScaleOptimizer
(a fixed scale of 1 under bf16 / float32) so that a non-finite step is skipped,
never applied. This measures what that costs against the plain optimizer on the
default reference MLP: two identical models take turns in short blocks
(benchmarks/interleave.py) and the median per-round speed ratio is printed.

  python -m benchmarks.guard_overhead --rounds=20 --block=40 --clock=cpu
"""

import statistics
from typing import Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
interleave.define_flags(rounds=20, block=40, batch_size=128)  # tools/train's batch size


def main(argv: Sequence[str]) -> None:
    import keras
    import models
    import tfmp

    policy = tfmp.set_policy(FLAGS.precision)
    clock = interleave.CLOCKS[FLAGS.clock]

    def build(guard: bool) -> keras.Model:
        keras.utils.set_random_seed(0)
        model = models.get("mlp")[0]()  # 64 -> 256 -> 256 -> 10
        opt = tfmp.wrap_optimizer(keras.optimizers.Adam(1e-3), policy, guard=guard)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    data = interleave.random_batches(64, FLAGS.batch_size)
    blocks = {name: interleave.fit_block(build(name == "guard"), data, FLAGS.block, clock)
              for name in ("plain", "guard")}
    times = interleave.interleaved(blocks, FLAGS.rounds, FLAGS.warmup)
    speed, q1, q3 = interleave.ratio_summary(times["plain"], times["guard"])
    print(f"policy={policy} model=mlp (default) batch={FLAGS.batch_size} block={FLAGS.block} "
          f"rounds={FLAGS.rounds} clock={FLAGS.clock}")
    print(f"median step time, plain optimizer:   {1e3 * statistics.median(times['plain']):.3f} ms")
    print(f"median step time, guarded optimizer: {1e3 * statistics.median(times['guard']):.3f} ms")
    print(f"guarded speed as a share of plain: {speed:.3f} (quartiles {q1:.3f} .. {q3:.3f})")


if __name__ == "__main__":
    app.run(main)
