"""Audits a saved Keras model for mixed-precision problems.

  python -m tools.audit --model_path=m.keras            # findings and what ran; exit 1 on errors
  python -m tools.audit --model_path=m.keras --json     # the report as JSON
  python -m tools.audit --model_path=m.keras --import_modules=my_project.layers  # custom classes
  python -m tools.audit --model_path=m.keras --fix --output_path=fixed.keras
"""

import json
from typing import Sequence

from absl import flags

from tfmp.app import cli, saved_models

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "The .keras model to audit.", required=True)
flags.DEFINE_bool("fix", False, "Write a copy with float32 outputs, softmax and norms.")
flags.DEFINE_string("output_path", None, "Where --fix writes the fixed model (.keras).")
flags.DEFINE_bool("json", False, "Print the report as JSON instead of a table.")
flags.DEFINE_list("import_modules", [], cli.IMPORT_MODULES_HELP)


def _print(report) -> None:
    if FLAGS.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{report}\n\nwhat ran, layer by layer:\n{report.layer_table()}")


def main(argv: Sequence[str]) -> int:
    if FLAGS.fix and not FLAGS.output_path:
        cli.fail("--fix needs --output_path=FILE.keras")
    if FLAGS.output_path is not None and not FLAGS.output_path.endswith(".keras"):
        cli.fail(f"--output_path={FLAGS.output_path!r} must end with .keras")
    model = cli.load_keras_model(FLAGS.model_path, FLAGS.import_modules)
    report = saved_models.audit_saved(model)
    _print(report)
    if not FLAGS.fix:
        return 0 if report.ok else cli.EXIT_FINDINGS
    try:
        fixed = saved_models.fixed_copy(model)
    except ValueError as e:
        cli.fail(str(e).splitlines()[0])
    cli.save_keras_model_atomically(fixed, FLAGS.output_path)
    fixed_report = saved_models.audit_saved(fixed)
    print(f"\nwrote {FLAGS.output_path}; audit of the fixed model:")
    _print(fixed_report)
    return 0 if fixed_report.ok else cli.EXIT_FINDINGS


if __name__ == "__main__":
    cli.run(main)
