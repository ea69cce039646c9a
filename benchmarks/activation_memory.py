"""Activation memory of the reference models: stock Keras mixed precision against tfmp.prepare.

The bytes of every layer's and op's outputs for one batch (what backprop keeps), from
the models' tensor shapes and dtypes (`benchmarks.bench.activation_bytes`): no timing,
so the figures are the same on every machine. Columns, as multiples of float32's:
stock Keras built under the policy; `tfmp.prepare(float32 model, policy)`; and that
prepared model with every normalization layer made float32 (what tfmp.prepare did
in its first releases). The hardware is described as a GPU, so that the policy is not
refused as a trap on a CPU (nothing is run).

  python -m benchmarks.activation_memory --policy=mixed_bfloat16 --batch_size=128
"""

import warnings
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("policy", "mixed_bfloat16", ["mixed_bfloat16", "mixed_float16"], "16-bit policy.")
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_list("models", ["mlp", "cnn", "transformer"], "Reference models.")
flags.DEFINE_list("sizes", ["default", "large"], "Sizes (models.size_kwargs).")


def main(argv: Sequence[str]) -> None:
    import keras

    import models
    import tfmp
    from benchmarks.bench import activation_bytes

    gpu = tfmp.precision.HardwareInfo("gpu", ("GPU:0",), ((8, 0),))
    print(f"| model | size | float32 | Keras {FLAGS.policy} | tfmp.prepare | "
          "tfmp.prepare, every norm float32 |")
    print("|---|---|---|---|---|---|")
    for name in FLAGS.models:
        build = models.get(name)[0]
        for size in FLAGS.sizes:
            kwargs = models.size_kwargs(name, size)
            keras.config.set_dtype_policy("float32")
            float32_model = build(**kwargs)
            base = activation_bytes(float32_model, FLAGS.batch_size)
            keras.config.set_dtype_policy(FLAGS.policy)
            stock = activation_bytes(build(**kwargs), FLAGS.batch_size)
            keras.config.set_dtype_policy("float32")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prepared, _ = tfmp.prepare(float32_model, "adam", FLAGS.policy, hardware=gpu)
            ours = activation_bytes(prepared, FLAGS.batch_size)
            all_norms = activation_bytes(tfmp.enforce_float32(prepared), FLAGS.batch_size)
            print(f"| {name} | {size} | {base / 2**20:.1f} MiB | {stock / base:.2f}x | "
                  f"{ours / base:.2f}x | {all_norms / base:.2f}x |")
            keras.config.set_dtype_policy("float32")


if __name__ == "__main__":
    app.run(main)
