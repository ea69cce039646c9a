"""`tools/export`'s work: a saved or trained model exported to LiteRT (and to `.keras` files
with 16-bit release weights) in the chosen modes, each judged against the Keras model, and
`export.json` written beside the files.

`ExportConfig` is the binary's flags, of the same names; `export_model(config)` checks them,
loads the model and its data, exports, prints the table and returns the exit code. Bad input
is one line (`tfmp.app.cli.ToolError`, exit 2); an export that lost more accuracy than
`max_accuracy_drop` allows is exit 1, its files written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import keras
import numpy as np
from absl import flags, logging

from tfmp._messages import first_line
from tfmp.app import cli, data, outputs, run_dir, user_data
from tfmp.app.sources import run_modules
from tfmp.atomic import write_json_atomically
from tfmp.litert import ExportError, ExportReport, export_all, format_reports, gate_failures
from tfmp.litert.conversion import QUANTIZATIONS, calibration_batches, export_filename
from tfmp.litert.report import array_batches

REPORT = "export.json"
NAMES = (REPORT, *(export_filename(q) for q in QUANTIZATIONS))  # what a previous export left


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What an export is parameterized by: `tools/export`'s flags (see its help).

    Attributes:
        model_path: The `.keras` model to export; or give `model_dir`, not both.
        model_dir: A `tools/train --model_dir`: its `model.keras`, and its data, data_dir,
            seed and modules are the defaults here.
        import_modules: Modules to import before loading the model (its custom classes).
        quantization: The modes, each once (`tfmp.litert.conversion.QUANTIZATIONS`).
        output_dir: Where the files and `export.json` go (default `<model_dir>/export`,
            or `export`).
        overwrite: Move a previous export in `output_dir` aside instead of refusing.
        data: What `tools/train --data` takes (default: the run's, else synthetic).
        dataset: Alias of `data`.
        data_dir: tensorflow-datasets data directory.
        seed: Data seed (default: the run's, else 0).
        batch_size: Batch size for calibration and evaluation.
        calibration_steps: full_int8: batches to calibrate on.
        calibration_data: full_int8: a `.npy` array of example inputs to calibrate on
            instead of the training data.
        eval_steps: Evaluation batches (None: the whole eval split).
        metric: A Keras metric, higher is better.
        max_accuracy_drop: The gate: largest drop of the metric allowed (inf: no gate).
        int8_only: full_int8: fail when an op has no int8 kernel.
        runtime: The interpreter: auto, litert or tf.
    """

    model_path: Optional[str] = None
    model_dir: Optional[str] = None
    import_modules: Sequence[str] = ()
    quantization: Sequence[str] = QUANTIZATIONS
    output_dir: Optional[str] = None
    overwrite: bool = False
    data: Optional[str] = None
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    seed: Optional[int] = None
    batch_size: int = 64
    calibration_steps: int = 10
    calibration_data: Optional[str] = None
    eval_steps: Optional[int] = None
    metric: str = "sparse_categorical_accuracy"
    max_accuracy_drop: float = 0.01
    int8_only: bool = False
    runtime: str = "auto"

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> ExportConfig:
        """The parsed flags of the same names as the fields.

        Args:
            flag_values: Parsed flags defining every field's name.

        Returns:
            The configuration, not yet checked (`export_model` checks it).
        """
        return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})

    @property
    def gated(self) -> bool:
        """Whether the accuracy gate is on (`max_accuracy_drop` is not inf)."""
        return self.max_accuracy_drop != math.inf


def model_source(config: ExportConfig) -> tuple[str, dict[str, Any]]:
    """The model file, and the training run's flags when it comes from a `model_dir`.

    Args:
        config: The export's settings.

    Returns:
        `(path of the .keras file, the run's flags or {})`.

    Raises:
        tfmp.app.cli.ToolError: neither or both of `model_path` and `model_dir`, or a
            `model_dir` without a finished run (one line).
    """
    if bool(config.model_path) == bool(config.model_dir):
        cli.fail("give --model_path=FILE.keras or --model_dir=DIR (written by tools/train), one of them")
    if config.model_path:
        return config.model_path, {}
    try:
        return run_dir.trained_model(config.model_dir)
    except run_dir.RunDirError as e:
        cli.fail(str(e))


def checked_output_dir(config: ExportConfig) -> str:
    """Checks the modes, the gate and the metric, and that the output folder may be written.

    Args:
        config: The export's settings.

    Returns:
        The output folder.

    Raises:
        tfmp.app.cli.ToolError: a bad value (one line naming the flag), or an output folder
            holding a previous export without `overwrite`.
    """
    modes = list(config.quantization)
    if any(q not in QUANTIZATIONS for q in modes) or not modes or len(set(modes)) < len(modes):
        cli.fail(f"--quantization={','.join(modes)!r}: accepted values are "
                 f"{', '.join(QUANTIZATIONS)} (comma-separated, each once)")
    if math.isnan(config.max_accuracy_drop):
        cli.fail(f"--max_accuracy_drop={config.max_accuracy_drop} must be a number (0.01 = one "
                 "point of accuracy; inf turns the gate off)")
    try:
        keras.metrics.get(config.metric)
    except ValueError:
        cli.fail(f"--metric={config.metric!r} is not a Keras metric (e.g. "
                 "sparse_categorical_accuracy, binary_accuracy, sparse_top_k_categorical_accuracy)")
    output_dir = config.output_dir or (os.path.join(config.model_dir, "export") if config.model_dir
                                       else "export")
    outputs.check_output_dir(output_dir, NAMES, config.overwrite)
    return output_dir


def read_examples(path: str) -> np.ndarray:
    """The example inputs of a `.npy` file (`--calibration_data`).

    Args:
        path: The file.

    Returns:
        The array, of at least one dimension (the examples).

    Raises:
        tfmp.app.cli.ToolError: not a readable `.npy` file, an object (pickled) array, or a
            scalar (one line naming the flag).
    """
    flag = f"--calibration_data={path!r}"
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                cli.fail(f"{flag} is not a .npy file (np.save an array of example inputs)")
        array = np.load(path, allow_pickle=False)
    except OSError as e:
        cli.fail(f"{flag} cannot be read: {e.strerror or e}")
    except ValueError as e:  # an object array (pickled): not examples
        cli.fail(f"{flag}: {first_line(e)}")
    if array.ndim == 0:
        cli.fail(f"{flag} holds a scalar, not examples")
    return array


def _calibration(config: ExportConfig, d: data.Data,
                 model: keras.Model) -> Optional[list[np.ndarray]]:
    """The batches full_int8 calibrates on (None when it is not exported)."""
    if "full_int8" not in config.quantization:
        return None
    if config.calibration_data is None:
        return calibration_batches(d.train, config.calibration_steps, model)
    return calibration_batches(array_batches(read_examples(config.calibration_data),
                                             config.batch_size),
                               config.calibration_steps, model)


def _export(config: ExportConfig, model: keras.Model, path: str, seed: int, d: data.Data,
            output_dir: str) -> tuple[list[ExportReport], list[str]]:
    """Every mode exported and judged into a temporary folder, export.json written beside
    them, then all moved into `output_dir` (a previous export moved aside first)."""
    calibration = _calibration(config, d, model)
    with outputs.new_result(output_dir, NAMES, REPORT) as staging:
        reports = export_all(
            model, staging, list(config.quantization),
            calibration_data=calibration, calibration_steps=config.calibration_steps,
            eval_data=d.eval, eval_steps=config.eval_steps, metric=config.metric,
            int8_only=config.int8_only, runtime=config.runtime)
        reports = [dataclasses.replace(r, path=os.path.join(output_dir, os.path.basename(r.path)))
                   for r in reports]  # where they end up
        failures = gate_failures(reports, config.max_accuracy_drop, calibration_data=calibration,
                                 calibration_steps=config.calibration_steps, eval_data=d.eval,
                                 eval_steps=config.eval_steps) if config.gated else []
        logging.info("writing %s", os.path.join(output_dir, REPORT))
        write_json_atomically(os.path.join(staging, REPORT), {
            "model": path, "model_file_bytes": os.path.getsize(path), "dataset": d.name,
            "seed": seed, "reports": [r.to_dict() for r in reports],
            "max_accuracy_drop": config.max_accuracy_drop if config.gated else None,
            "gate_failures": failures})
    return reports, failures


def export_model(config: ExportConfig) -> int:
    """Exports the model in every mode of `config`, writes export.json and prints the table.

    Args:
        config: The export's settings (`ExportConfig.from_flags()` in a binary).

    Returns:
        0: written, and every export within `max_accuracy_drop` of the Keras model's metric.

    Raises:
        tfmp.app.cli.ToolError: bad input (one line, exit 2); the accuracy gate failed
            (exit 1: the files are written, the message has the figures and what usually
            causes such a drop in that mode).
    """
    path, trained_with = model_source(config)
    output_dir = checked_output_dir(config)
    seed = config.seed if config.seed is not None else trained_with.get("seed", 0)
    try:
        value = (user_data.data_flag(config.data, config.dataset) or trained_with.get("dataset")
                 or data.SYNTHETIC)
        model = cli.load_keras_model(path, config.import_modules or run_modules(trained_with))
        d = user_data.for_model(value, model, config.batch_size,
                                config.data_dir or trained_with.get("data_dir"), seed)
        reports, failures = _export(config, model, path, seed, d, output_dir)
    except (data.DatasetError, ExportError, ValueError) as e:
        cli.fail(first_line(e))
    print(format_reports(reports))
    if reports and reports[0].runtime == "tf" and config.runtime == "auto":
        print("evaluated with TensorFlow's deprecated tf.lite interpreter: pip install -e "
              "\".[litert]\" to evaluate with LiteRT's (int8 kernels differ between the two)")
    print(f"{path}: {os.path.getsize(path) / 1024:.1f} KB (weights and optimizer state); wrote "
          f"{', '.join(os.path.basename(r.path) for r in reports)} and {REPORT} to {output_dir}")
    if failures:
        cli.fail(f"accuracy gate (--max_accuracy_drop={config.max_accuracy_drop:g}) failed: "
                 + "; ".join(failures), code=cli.EXIT_FINDINGS)
    return 0
