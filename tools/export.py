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

import dataclasses
import math
import os
from typing import Sequence

import keras
import numpy as np
from absl import flags, logging

from tfmp.app import cli, data, outputs, run_dir, user_data
from tfmp.app.sources import run_modules
from tfmp.atomic import write_json_atomically
from tfmp.litert import ExportError, export_all
from tfmp.litert.conversion import QUANTIZATIONS, calibration_batches, export_filename
from tfmp.litert.gate import gate_failures
from tfmp.litert.report import array_batches, format_reports

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "The .keras model to export.")
flags.DEFINE_list("import_modules", [], cli.IMPORT_MODULES_HELP + " Default with --model_dir: "
                  "the run's --import_modules and the module of its --model function.")
flags.DEFINE_string("model_dir", None, "A tools/train --model_dir (its model.keras; its "
                    "dataset, data_dir and seed are the defaults here).")
flags.DEFINE_list("quantization", list(QUANTIZATIONS),
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
flags.DEFINE_integer("batch_size", 64, "Batch size for calibration and evaluation.", lower_bound=1)
flags.DEFINE_integer("calibration_steps", 10, "full_int8: training batches to calibrate on.",
                     lower_bound=1)
flags.DEFINE_string("calibration_data", None, "full_int8: a .npy array of example inputs "
                    "to calibrate on instead of the training data.")
flags.DEFINE_integer("eval_steps", None, "Evaluation batches (default: the whole eval split).",
                     lower_bound=1)
flags.DEFINE_string("metric", "sparse_categorical_accuracy", "A Keras metric, higher is better "
                    "(binary_accuracy for one sigmoid output, ...).")
flags.DEFINE_float("max_accuracy_drop", 0.01, "Fail (exit 1) when an export's metric is more "
                   "than this below the Keras model's (0.01 = one point of accuracy; inf: no gate).")
flags.DEFINE_bool("int8_only", False, "full_int8: fail when an op has no int8 kernel "
                  "(integer-only accelerators) instead of leaving it in float32.")
flags.DEFINE_enum("runtime", "auto", ("auto", "litert", "tf"),
                  "Interpreter: LiteRT (ai-edge-litert) if installed, else tf.lite.")

REPORT = "export.json"
NAMES = (REPORT, *(export_filename(q) for q in QUANTIZATIONS))  # what a previous export left


def _source() -> tuple[str, dict]:
    """The model file, and the training run's flags when it comes from a --model_dir."""
    if bool(FLAGS.model_path) == bool(FLAGS.model_dir):
        cli.fail("give --model_path=FILE.keras or --model_dir=DIR (written by tools/train), one of them")
    if FLAGS.model_path:
        return FLAGS.model_path, {}
    try:
        return run_dir.trained_model(FLAGS.model_dir)
    except run_dir.RunDirError as e:
        cli.fail(str(e))


def _validate() -> str:
    bad = [q for q in FLAGS.quantization if q not in QUANTIZATIONS]
    if bad or not FLAGS.quantization or len(set(FLAGS.quantization)) < len(FLAGS.quantization):
        cli.fail(f"--quantization={','.join(FLAGS.quantization)!r}: accepted values are "
                 f"{', '.join(QUANTIZATIONS)} (comma-separated, each once)")
    if math.isnan(FLAGS.max_accuracy_drop):
        cli.fail(f"--max_accuracy_drop={FLAGS.max_accuracy_drop} must be a number (0.01 = one "
                 "point of accuracy; inf turns the gate off)")
    try:
        keras.metrics.get(FLAGS.metric)
    except ValueError:
        cli.fail(f"--metric={FLAGS.metric!r} is not a Keras metric (e.g. sparse_categorical_accuracy, "
                 "binary_accuracy, sparse_top_k_categorical_accuracy)")
    output_dir = FLAGS.output_dir or (os.path.join(FLAGS.model_dir, "export") if FLAGS.model_dir
                                      else "export")
    outputs.check_output_dir(output_dir, NAMES, FLAGS.overwrite)
    return output_dir


def _calibration(d, model):
    if "full_int8" not in FLAGS.quantization:
        return None
    if FLAGS.calibration_data is None:
        return calibration_batches(d.train, FLAGS.calibration_steps, model)
    try:
        with open(FLAGS.calibration_data, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                cli.fail(f"--calibration_data={FLAGS.calibration_data!r} is not a .npy file "
                         "(np.save an array of example inputs)")
        array = np.load(FLAGS.calibration_data, allow_pickle=False)
    except OSError as e:
        cli.fail(f"--calibration_data={FLAGS.calibration_data!r} cannot be read: {e.strerror or e}")
    except ValueError as e:  # an object array (pickled): not examples
        cli.fail(f"--calibration_data={FLAGS.calibration_data!r}: {str(e).splitlines()[0]}")
    if array.ndim == 0:
        cli.fail(f"--calibration_data={FLAGS.calibration_data!r} holds a scalar, not examples")
    return calibration_batches(array_batches(array, FLAGS.batch_size), FLAGS.calibration_steps,
                               model)


def _export(model, path: str, seed: int, d: data.Data, output_dir: str) -> tuple[list, list]:
    """Every mode exported and judged into a temporary folder, export.json written beside
    them, then all moved into `output_dir` (a previous export moved aside first)."""
    calibration = _calibration(d, model)
    gated = FLAGS.max_accuracy_drop != math.inf
    with outputs.new_result(output_dir, NAMES, REPORT) as staging:
        reports = export_all(
            model, staging, FLAGS.quantization,
            calibration_data=calibration, calibration_steps=FLAGS.calibration_steps,
            eval_data=d.eval, eval_steps=FLAGS.eval_steps, metric=FLAGS.metric,
            int8_only=FLAGS.int8_only, runtime=FLAGS.runtime)
        reports = [dataclasses.replace(r, path=os.path.join(output_dir, os.path.basename(r.path)))
                   for r in reports]  # where they end up
        failures = gate_failures(reports, FLAGS.max_accuracy_drop, calibration_data=calibration,
                                 calibration_steps=FLAGS.calibration_steps, eval_data=d.eval,
                                 eval_steps=FLAGS.eval_steps) if gated else []
        logging.info("writing %s", os.path.join(output_dir, REPORT))
        write_json_atomically(os.path.join(staging, REPORT), {
            "model": path, "model_file_bytes": os.path.getsize(path), "dataset": d.name,
            "seed": seed, "reports": [r.to_dict() for r in reports],
            "max_accuracy_drop": FLAGS.max_accuracy_drop if gated else None,
            "gate_failures": failures})
    return reports, failures


def main(argv: Sequence[str]) -> int:
    path, trained_with = _source()
    output_dir = _validate()
    seed = FLAGS.seed if FLAGS.seed is not None else trained_with.get("seed", 0)
    try:
        value = (user_data.data_flag(FLAGS.data, FLAGS.dataset) or trained_with.get("dataset")
                 or data.SYNTHETIC)
        model = cli.load_keras_model(path, FLAGS.import_modules or run_modules(trained_with))
        d = user_data.for_model(value, model, FLAGS.batch_size,
                                FLAGS.data_dir or trained_with.get("data_dir"), seed)
        reports, failures = _export(model, path, seed, d, output_dir)
    except (data.DatasetError, ExportError, ValueError) as e:
        cli.fail(str(e).splitlines()[0])
    print(format_reports(reports))
    if reports and reports[0].runtime == "tf" and FLAGS.runtime == "auto":
        print("evaluated with TensorFlow's deprecated tf.lite interpreter: pip install -e "
              "\".[litert]\" to evaluate with LiteRT's (int8 kernels differ between the two)")
    print(f"{path}: {os.path.getsize(path) / 1024:.1f} KB (weights and optimizer state); wrote "
          f"{', '.join(os.path.basename(r.path) for r in reports)} and {REPORT} to {output_dir}")
    if failures:
        cli.fail(f"accuracy gate (--max_accuracy_drop={FLAGS.max_accuracy_drop:g}) failed: "
                 + "; ".join(failures), code=cli.EXIT_FINDINGS)
    return 0


if __name__ == "__main__":
    cli.run(main)
