"""Trains a model under float32 and mixed policies side by side and compares them.

  python -m tools.compare                                  # mlp, synthetic task, float32 vs auto
  python -m tools.compare --model=cnn --policies=fp32,bf16,fp16 --steps=100 --overwrite
  python -m tools.compare --policies=fp32,bf16,bf16w --overwrite   # bf16w: bfloat16 weights
  python -m tools.compare --model_path=runs/mlp/model.keras --policies=fp32,bf16 --overwrite
  python -m tools.compare --model_path=runs/a/model.keras --import_modules=my_project.models \\
      --data=arrays.npz --overwrite    # a tools/train run on the user's model and data
  python -m tools.compare --tolerance=0.02 --output_dir=runs/compare

--data (alias --dataset) is what tools/train takes: synthetic (default), a tensorflow-datasets
name, an .npz file or package.module:function (tfmp.app.user_data); it is checked against a
--model_path model first (sample weights are left out: the policies are compared on the
unweighted loss). A saved model trains with its compiled loss (else one that matches its
output). Writes compare.json and compare.png (loss per policy over the steps, and the loss
scale) to --output_dir (default compare/). An output folder holding a previous
comparison is refused unless --overwrite, which moves its files into
<output_dir>/previous.<date>-<time>/ once this one is written (tfmp.app.outputs).
Exit code 0: every policy within the tolerance; 1: one was not; 2: bad input.
"""

import functools
import math
import os
from typing import Sequence

import keras
from absl import flags, logging

import models
from tfmp.app import cli, data, outputs, user_data
from tfmp.atomic import write_json_atomically
from tfmp.measure import compare_precision, plot_comparison
from tfmp.preparation import AuditError
from tfmp.rewrite.inplace import is_copyable

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", None, tuple(models.REGISTRY),
                  "Reference model (default mlp); or give --model_path.")
flags.DEFINE_string("model_path", None, "A saved .keras model to compare instead.")
flags.DEFINE_list("import_modules", [], cli.IMPORT_MODULES_HELP)
flags.DEFINE_string("data", None, "'synthetic' (default), a tensorflow-datasets name, an .npz "
                    "file or package.module:function, as for tools/train.")
flags.DEFINE_string("dataset", None, "Alias of --data.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_list("policies", ["float32", "auto"],
                  "Comma-separated policies, each optionally +xla; bf16w / fp16w: "
                  "mixed_bfloat16 / mixed_float16 with 16-bit weights (tfmp.prepare's "
                  "weights_dtype). The first is the baseline.")
flags.DEFINE_integer("steps", 50, "Training steps per policy.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_float("tolerance", 0.05, "Largest relative loss gap to the baseline that passes.")
flags.DEFINE_integer("seed", 0, "Seed for the initial weights and the data.")
flags.DEFINE_string("output_dir", "compare", "Where compare.json and compare.png go.")
flags.DEFINE_bool("overwrite", False, outputs.OVERWRITE_HELP)

JSON_NAME, PNG_NAME = "compare.json", "compare.png"


def _validate() -> None:
    if FLAGS.model and FLAGS.model_path:
        cli.fail("give --model or --model_path, not both")
    if not math.isfinite(FLAGS.learning_rate) or FLAGS.learning_rate <= 0:
        cli.fail(f"--learning_rate={FLAGS.learning_rate} must be a positive finite number")
    outputs.check_output_dir(FLAGS.output_dir, (JSON_NAME, PNG_NAME), FLAGS.overwrite)


def main(argv: Sequence[str]) -> int:
    _validate()
    try:
        value = user_data.data_flag(FLAGS.data, FLAGS.dataset) or data.SYNTHETIC
        if FLAGS.model_path:
            saved = cli.load_keras_model(FLAGS.model_path, FLAGS.import_modules)
            d = user_data.for_model(value, saved, FLAGS.batch_size, FLAGS.data_dir, FLAGS.seed)
            # prepare copies a Sequential or Functional model for every policy; any other kind
            # is converted in place, so every policy loads its own.
            build = ((lambda: saved) if is_copyable(saved)
                     else functools.partial(cli.load_keras_model, FLAGS.model_path))
        else:
            builder, kind = models.get(FLAGS.model or "mlp")
            d = user_data.load_data(value, kind, FLAGS.batch_size, FLAGS.data_dir, FLAGS.seed)
            build = functools.partial(builder, **d.model_kwargs())
            if user_data.is_user_data(value):  # not made for the model: checked on one copy
                user_data.check_model(build(), d)
        result = compare_precision(
            build, user_data.unweighted(d), policies=FLAGS.policies, steps=FLAGS.steps, seed=FLAGS.seed,
            optimizer=lambda: keras.optimizers.Adam(FLAGS.learning_rate),
            tolerance=FLAGS.tolerance, eval_data=d.eval, metrics=["accuracy"])
    except (data.DatasetError, AuditError, ValueError) as e:  # compare_precision's checks
        cli.fail(cli.first_line(e))
    json_path, png_path = (os.path.join(FLAGS.output_dir, n) for n in (JSON_NAME, PNG_NAME))
    with outputs.new_result(FLAGS.output_dir, (JSON_NAME, PNG_NAME), JSON_NAME) as staging:
        logging.info("writing %s", json_path)
        write_json_atomically(os.path.join(staging, JSON_NAME),
                              {"dataset": d.name, **result.to_dict()})
        try:
            logging.info("drawing %s", png_path)
            plot_comparison(result, os.path.join(staging, PNG_NAME))
            wrote = f"wrote {json_path} and {png_path}"
        except ImportError as e:
            wrote = f"wrote {json_path}; no plot: {e}"
    print(result)
    print(wrote)
    return 0 if result.ok else cli.EXIT_FINDINGS


if __name__ == "__main__":
    cli.run(main)
