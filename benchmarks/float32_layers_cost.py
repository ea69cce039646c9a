"""What `tfmp.prepare(..., float32_layers=[...])` costs per step: the layer kept in float32, nothing more.

Three copies of one MLP (784 -> width -> width -> width -> 10) train side by side under the
16-bit policy, taking turns a block of steps each, after warm-up:
- `half`: every hidden layer 16-bit (plain `tfmp.prepare`);
- `kept`: `tfmp.prepare(..., float32_layers=["dense_1"])`;
- `by_hand`: the same layer given `dtype="float32"` when the model is built (what a user
  writes by hand), then plain `tfmp.prepare`.
`kept / by_hand` near 1 is the claim (no cost beyond the float32 layer itself);
`kept / half` is the float32 layer's own cost on this hardware.

  python -m benchmarks.float32_layers_cost --precision=bf16 --rounds=15 --block=30
"""

import statistics
from typing import Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
interleave.define_flags(rounds=15, block=30, batch_size=256)
flags.DEFINE_integer("width", 1024, "Hidden width of the MLP.")


def main(argv: Sequence[str]) -> None:
    import keras
    import tfmp

    def build(float32_by_hand: bool = False, kept: Sequence[str] = ()) -> keras.Model:
        keras.utils.set_random_seed(0)
        with tfmp.policy_scope("float32"):
            layers = [keras.layers.Dense(FLAGS.width, activation="relu", name=f"dense_{i}",
                                         dtype="float32" if float32_by_hand and i == 1 else None)
                      for i in range(3)]
            model = keras.Sequential([keras.Input((784,)), *layers,
                                      keras.layers.Dense(10, name="logits")])
        model, opt = tfmp.prepare(model, keras.optimizers.Adam(1e-3), FLAGS.precision,
                                  float32_layers=list(kept))
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    data = interleave.random_batches(784, FLAGS.batch_size)
    clock = interleave.CLOCKS[FLAGS.clock]
    models = {"half": build(), "kept": build(kept=["dense_1"]), "by_hand": build(True)}
    policies = {name: m.get_layer("dense_1").dtype_policy.name for name, m in models.items()}
    blocks = {name: interleave.fit_block(m, data, FLAGS.block, clock) for name, m in models.items()}
    times = interleave.interleaved(blocks, FLAGS.rounds, FLAGS.warmup)
    print(f"precision={FLAGS.precision} batch={FLAGS.batch_size} width={FLAGS.width} "
          f"block={FLAGS.block} rounds={FLAGS.rounds}; dense_1: {policies}")
    for name in models:
        print(f"median step time, {name:8s} {1e3 * statistics.median(times[name]):.3f} ms")
    for top, bottom in (("kept", "by_hand"), ("kept", "half")):
        med, q1, q3 = interleave.ratio_summary(times[top], times[bottom])
        print(f"median per-round ratio {top}/{bottom}: {med:.4f} (quartiles {q1:.4f} .. {q3:.4f})")


if __name__ == "__main__":
    app.run(main)
