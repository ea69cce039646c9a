"""Step-time cost of the NaN guard and the monitors in model.fit, part by part.

tools/train trains every precision through a guarded DynamicLossScaleOptimizer
(a fixed scale of 1 under bf16 / float32) so that a non-finite step is skipped,
never applied, with LossScaleMonitor and NanMonitor. This measures what each
part costs on a reference model at its default size, in one process: identical
models take turns in short blocks (benchmarks/interleave.py), and the median
per-round speed ratio to the plain model is printed with its quartiles.

Arms: `plain` (`tfmp.prepare(..., guard=False)`, what `tfmp_auto` runs in
tools/bench), `guard` (`guard=True`: the loss-scale optimizer's finiteness check,
conditional update and counters), `guarded` (`guard=True` plus both monitors:
the counters metric and the forward-state guard; what tools/train runs).

  python -m benchmarks.guard_overhead --model=mlp --rounds=20 --block=40 --clock=cpu
"""

import statistics
from typing import Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
interleave.define_flags(rounds=20, block=40, batch_size=128)  # tools/train's batch size
flags.DEFINE_enum("model", "mlp", ("mlp", "cnn", "transformer"), "Reference model (default size).")
flags.DEFINE_list("arms", "plain,guard,guarded", "Arms to run (plain first: the baseline).")
ARMS = ("plain", "guard", "guarded")


def main(argv: Sequence[str]) -> None:
    import keras
    import tensorflow as tf

    import models
    import tfmp
    from tfmp.app import data as app_data

    policy = tfmp.set_policy(FLAGS.precision)
    clock = interleave.CLOCKS[FLAGS.clock]
    unknown = [arm for arm in FLAGS.arms if arm not in ARMS]
    if unknown or not FLAGS.arms or FLAGS.arms[0] != "plain":
        raise app.UsageError(f"--arms={','.join(FLAGS.arms)}: give plain first, then any of "
                             f"{', '.join(ARMS[1:])}")
    build_model = models.get(FLAGS.model)[0]

    def build(arm: str) -> tuple[keras.Model, list]:
        keras.utils.set_random_seed(0)
        model, opt = tfmp.prepare(build_model(), keras.optimizers.Adam(1e-3), policy,
                                  guard=arm != "plain")
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        monitors = ([tfmp.callbacks.LossScaleMonitor(), tfmp.callbacks.NanMonitor()]
                    if arm == "guarded" else [])
        return model, monitors

    built = {arm: build(arm) for arm in FLAGS.arms}
    x, y, _ = app_data.synthetic_arrays(app_data.input_kind(built["plain"][0]),
                                         FLAGS.batch_size * 8, 0)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch_size).repeat()
    blocks = {arm: interleave.fit_block(model, batches.prefetch(2), FLAGS.block, clock, monitors)
              for arm, (model, monitors) in built.items()}
    times = interleave.interleaved(blocks, FLAGS.rounds, FLAGS.warmup)
    print(f"policy={policy} model={FLAGS.model} (default) batch={FLAGS.batch_size} "
          f"block={FLAGS.block} rounds={FLAGS.rounds} clock={FLAGS.clock}")
    for arm in FLAGS.arms:
        speed, q1, q3 = interleave.ratio_summary(times["plain"], times[arm])
        print(f"{arm:8s} median step {1e3 * statistics.median(times[arm]):8.3f} ms   speed vs "
              f"plain {speed:.3f} (quartiles {q1:.3f} .. {q3:.3f})")


if __name__ == "__main__":
    app.run(main)
