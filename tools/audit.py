"""Audits a saved Keras model for mixed-precision problems.

  python -m tools.audit --model_path=m.keras            # findings and what ran; exit 1 on errors
  python -m tools.audit --model_path=m.keras --json     # the report as JSON
  python -m tools.audit --model_path=m.keras --import_modules=my_project.layers  # custom classes
  python -m tools.audit --model_path=m.keras --fix --output_path=fixed.keras
  python -m tools.audit --model_path=m.keras --locate_overflows --data=inputs.npz  # float16 overflows
"""

import json
from typing import Sequence

import tensorflow as tf
from absl import flags

from tfmp.app import cli, saved_models

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "The .keras model to audit.", required=True)
flags.DEFINE_bool("fix", False, "Write a copy with float32 outputs, softmax and norms.")
flags.DEFINE_string("output_path", None, "Where --fix writes the fixed model (.keras).")
flags.DEFINE_bool("json", False, "Print the report as JSON instead of a table.")
flags.DEFINE_list("import_modules", [], cli.IMPORT_MODULES_HELP)
flags.DEFINE_bool("locate_overflows", False, "Also run the model in 16 bits on --data and list "
                  "the layers that must compute in float32 (tfmp.locate_overflows); exit 1 if any.")
flags.DEFINE_string("data", "synthetic", "--locate_overflows: 'synthetic' (tools.train's task for "
                    "the model's input kind) or a .npz file with arrays x (and y).")
flags.DEFINE_enum("policy", "mixed_float16", ("mixed_float16", "mixed_bfloat16"),
                  "--locate_overflows: the 16-bit policy to check.")
flags.DEFINE_integer("steps", 8, "--locate_overflows: batches to run.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "--locate_overflows: batch size for .npz data.",
                     lower_bound=1)


def _print(report) -> None:
    if FLAGS.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{report}\n\nwhat ran, layer by layer:\n{report.layer_table()}")


def _locate(model) -> int:
    try:
        data = saved_models.calibration_data(model, FLAGS.data, FLAGS.batch_size)
        report = saved_models.locate_saved(model, data, policy=FLAGS.policy, steps=FLAGS.steps,
                                           batch_size=FLAGS.batch_size)
    except (ValueError, tf.errors.OpError) as e:  # DatasetError; data that do not fit the model
        cli.fail(cli.first_line(e))
    print(json.dumps(report.to_dict(), indent=2) if FLAGS.json else report)
    return 0 if report.ok else cli.EXIT_FINDINGS


def main(argv: Sequence[str]) -> int:
    if FLAGS.fix and not FLAGS.output_path:
        cli.fail("--fix needs --output_path=FILE.keras")
    if FLAGS.output_path is not None and not FLAGS.output_path.endswith(".keras"):
        cli.fail(f"--output_path={FLAGS.output_path!r} must end with .keras")
    model = cli.load_keras_model(FLAGS.model_path, FLAGS.import_modules)
    if FLAGS.locate_overflows:
        return _locate(model)
    report = saved_models.audit_saved(model)
    _print(report)
    if not FLAGS.fix:
        return 0 if report.ok else cli.EXIT_FINDINGS
    try:
        fixed = saved_models.fixed_copy(model)
    except ValueError as e:
        cli.fail(cli.first_line(e))
    cli.save_keras_model_atomically(fixed, FLAGS.output_path)
    fixed_report = saved_models.audit_saved(fixed)
    print(f"\nwrote {FLAGS.output_path}; audit of the fixed model:")
    _print(fixed_report)
    return 0 if fixed_report.ok else cli.EXIT_FINDINGS


if __name__ == "__main__":
    cli.run(main)
