"""Training speed and memory of each precision variant of the reference models, against float32.

  python -m tools.bench                                     # every model, both sizes
  python -m tools.bench --models=transformer --sizes=large --rounds=15
  python -m tools.bench --variants=float32,keras_bf16,tfmp_auto --output=bench.json

Every variant trains in a process of its own; the processes take turns, one short
block of `model.fit` steps each, round after round (benchmarks/bench.py). Prints a
Markdown table (speed: median of the per-round ratios to float32, quartiles in
brackets; memory: peak resident set, the part of it above the imports, and the
bytes of the layers' outputs, each as a ratio to float32) and writes the rows
as JSON to --output.
"""

import os
from typing import Sequence

import keras
from absl import flags

import models
import tfmp
from benchmarks import bench
from tfmp.app import cli
from tfmp.atomic import write_json_atomically

FLAGS = flags.FLAGS
MODELS = tuple(models.REGISTRY)
VARIANT_NAMES = tuple(bench.VARIANTS)
flags.DEFINE_list("models", list(MODELS), f"Reference models: {', '.join(MODELS)}.")
flags.DEFINE_list("sizes", list(models.SIZES), f"Model sizes: {', '.join(models.SIZES)}.")
flags.DEFINE_list("variants", list(VARIANT_NAMES),
                  f"Variants (float32 always runs: it is the baseline): {', '.join(VARIANT_NAMES)}.")
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_integer("rounds", 10, "Measured rounds (one block per variant each).", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Unmeasured rounds first.", lower_bound=0)
flags.DEFINE_float("block_seconds", 1.0, "Target length of one block (at least 3 steps).")
flags.DEFINE_string("output", "bench.json", "Where the JSON rows go.")


def _check_list(name: str, accepted: Sequence[str]) -> list[str]:
    values = getattr(FLAGS, name)
    bad = [v for v in values if v not in accepted]
    if bad or not values:
        cli.fail(f"--{name}={','.join(values)}: {', '.join(bad) or 'empty'} not accepted; "
                 f"accepted: {', '.join(accepted)}")
    return list(dict.fromkeys(values))


def main(argv: Sequence[str]) -> int:
    models_, variants = _check_list("models", MODELS), _check_list("variants", VARIANT_NAMES)
    sizes = _check_list("sizes", models.SIZES)
    if not 0 < FLAGS.block_seconds <= 60:
        cli.fail(f"--block_seconds={FLAGS.block_seconds} must be in (0, 60]")
    directory = os.path.dirname(os.path.abspath(FLAGS.output))
    if not os.path.isdir(directory):
        cli.fail(f"--output={FLAGS.output!r}: directory {directory!r} does not exist")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the workers' C++ start-up lines
    hardware = tfmp.detect_hardware()
    names = list(dict.fromkeys([bench.BASELINE, *variants]))
    runs = sum(1 for v in names if bench.skip_reason(v, hardware) is None)
    bar = keras.utils.Progbar(len(models_) * len(sizes) * runs * (FLAGS.rounds + FLAGS.warmup),
                              unit_name="block")
    rows = []
    for name in models_:
        for size in sizes:
            try:
                rows += bench.bench_model(
                    name, size, variants, batch_size=FLAGS.batch_size, rounds=FLAGS.rounds,
                    warmup=FLAGS.warmup, block_seconds=FLAGS.block_seconds, hardware=hardware,
                    progress=lambda: bar.add(1))
            except RuntimeError as e:
                cli.fail(str(e), cli.EXIT_FINDINGS)
    table = bench.markdown_table(rows)
    write_json_atomically(FLAGS.output, {
        "command": "python -m tools.bench " + " ".join(FLAGS[f].serialize() for f in (
            "models", "sizes", "variants", "batch_size", "rounds", "warmup", "block_seconds")),
        "hardware": hardware.describe().splitlines(),
        "variants": {v: bench.VARIANTS[v] for v in names},
        "rows": rows})
    print("\n" + table)
    print(f"\nauto here: {hardware.recommended_policy} ({hardware.reason})")
    for line in bench.footnotes(rows):  # only for rows the table marks
        print(line)
    print(f"\nwrote {FLAGS.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
