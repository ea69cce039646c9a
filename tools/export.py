"""Exports a trained Keras model to quantized LiteRT files and checks that accuracy held.

  python -m tools.export --model_dir=runs/mlp       # float32 (baseline), float16, dynamic_int8, full_int8
  python -m tools.export --model_path=m.keras --quantization=full_int8 --calibration_steps=20 --output_dir=export_int8
  python -m tools.export --model_dir=runs/mlp --max_accuracy_drop=0.02 --overwrite  # a looser gate
  python -m tools.export --model_dir=runs/mlp --max_accuracy_drop=inf --overwrite     # no gate
  python -m tools.export --model_dir=runs/a   # a run on your model and data: its --data and modules

--data (alias --dataset) is what tools/train takes: synthetic, a tensorflow-datasets name, an
.npz file or package.module:function (tfmp.app.user_data); default: the --model_dir run's, else
synthetic. Full_int8 calibrates on its training batches, the gate evaluates on its eval data;
it is checked against the model first.

Writes model_<quantization>.tflite (model_keras_bfloat16.keras and model_keras_float16.keras: the
.keras file with 16-bit release weights) and export.json (one report per export) to
--output_dir (default: <model_dir>/export, or export/) and prints the table. An output
folder holding a previous export is refused unless --overwrite, which moves that export's
files into <output_dir>/previous.<date>-<time>/ once this one is written (tfmp.app.outputs).
Exit code 0: written, and every export within --max_accuracy_drop (default 0.01) of
the Keras model's metric; 1: the gate failed (the files are written; the message
has the figures and what usually causes such a drop in that mode); 2: bad input,
one line.
"""

from typing import Sequence

from absl import flags

from tfmp.app import cli, exporting, outputs
from tfmp.litert.conversion import QUANTIZATIONS

DEFAULT = exporting.ExportConfig()
flags.DEFINE_string("model_path", None, "The .keras model to export.")
flags.DEFINE_list("import_modules", [], cli.IMPORT_MODULES_HELP + " Default with --model_dir: "
                  "the run's --import_modules and the module of its --model function.")
flags.DEFINE_string("model_dir", None, "A tools/train --model_dir (its model.keras; its "
                    "dataset, data_dir and seed are the defaults here).")
flags.DEFINE_list("quantization", list(DEFAULT.quantization),
                  f"Comma-separated: {', '.join(QUANTIZATIONS)} (float32: not quantized, the "
                  "baseline row; keras_*: the .keras file with 16-bit release weights).")
flags.DEFINE_string("output_dir", None, "Where the .tflite files and export.json go "
                    "(default <model_dir>/export, or export).")
flags.DEFINE_bool("overwrite", False, outputs.OVERWRITE_HELP)
flags.DEFINE_string("data", None, "'synthetic', a tensorflow-datasets name, an .npz file or "
                    "package.module:function, as for tools/train (default: the model_dir's, "
                    "else synthetic).")
flags.DEFINE_string("dataset", None, "Alias of --data.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_integer("seed", None, "Data seed (default: the model_dir's, else 0).")
flags.DEFINE_integer("batch_size", DEFAULT.batch_size, "Batch size for calibration and evaluation.",
                     lower_bound=1)
flags.DEFINE_integer("calibration_steps", DEFAULT.calibration_steps,
                     "full_int8: training batches to calibrate on.", lower_bound=1)
flags.DEFINE_string("calibration_data", None, "full_int8: a .npy array of example inputs "
                    "to calibrate on instead of the training data.")
flags.DEFINE_integer("eval_steps", None, "Evaluation batches (default: the whole eval split).",
                     lower_bound=1)
flags.DEFINE_string("metric", DEFAULT.metric, "A Keras metric, higher is better "
                    "(binary_accuracy for one sigmoid output, ...).")
flags.DEFINE_float("max_accuracy_drop", DEFAULT.max_accuracy_drop, "Fail (exit 1) when an "
                   "export's metric is more than this below the Keras model's (0.01 = one point "
                   "of accuracy; inf: no gate).")
flags.DEFINE_bool("int8_only", False, "full_int8: fail when an op has no int8 kernel "
                  "(integer-only accelerators) instead of leaving it in float32.")
flags.DEFINE_enum("runtime", DEFAULT.runtime, ("auto", "litert", "tf"),
                  "Interpreter: LiteRT (ai-edge-litert) if installed, else tf.lite.")


def main(argv: Sequence[str]) -> int:
    return exporting.export_model(exporting.ExportConfig.from_flags())


if __name__ == "__main__":
    cli.run(main)
