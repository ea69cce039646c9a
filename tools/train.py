"""Trains a reference model in mixed precision.

  python -m tools.train                                   # mlp on the synthetic task, precision auto
  python -m tools.train --model=cnn --precision=bf16 --epochs=5 --model_dir=runs/cnn
  python -m tools.train --model=transformer --dataset=imdb_reviews --data_dir=~/tensorflow_datasets
  python -m tools.train --strategy=mirrored --num_cpu_devices=2 --batch_size=256

Re-running a command with the same --model_dir resumes after the last completed epoch.
"""

import math
import os
from typing import Sequence

from absl import flags

import models
from tfmp import cli

FLAGS = flags.FLAGS
MODELS = tuple(models.REGISTRY)
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu", "off")
NAN_POLICIES = ("skip", "stop", "raise")
PRECISIONS = ("auto", "tune", "mixed_float16", "fp16", "float16", "mixed_bfloat16", "bf16", "bfloat16",
              "float32", "fp32")

flags.DEFINE_enum("model", "mlp", MODELS, "Reference model.")
flags.DEFINE_string("dataset", "synthetic", "'synthetic' or a tensorflow-datasets name.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_enum("precision", None, PRECISIONS, "Precision policy (default auto; any case). "
                  "tune: time float32 and each 16-bit policy on this model and batch first "
                  "(tfmp.tune) and train with the fastest that passes.", case_sensitive=False)
flags.DEFINE_integer("tune_steps", 20, "Steps per policy that --precision=tune measures.",
                     lower_bound=3)
flags.DEFINE_enum("dtype", None, ("fp16", "bf16", "fp32"), "Model Garden alias of --precision.",
                  case_sensitive=False)
flags.DEFINE_string("loss_scale", "dynamic", "'dynamic' or a positive number (float16 only).")
flags.DEFINE_float("initial_scale", None, "Initial loss scale (float16).")
flags.DEFINE_integer("growth_interval", None, "Clean steps before the loss scale grows.")
flags.DEFINE_float("min_scale", None, "Floor of the loss scale (default 1).")
flags.DEFINE_enum("strategy", None, STRATEGIES, "Distribution strategy (default auto).")
flags.DEFINE_enum("distribution_strategy", None, STRATEGIES, "Model Garden alias of --strategy.")
flags.DEFINE_string("tpu", None, "TPU address, or 'local' on a TPU VM.")
flags.DEFINE_float("cluster_timeout", 120.0, "multi_worker_mirrored: seconds to wait for every "
                   "worker in TF_CONFIG before giving up (one line, then the worker is killed).")
flags.DEFINE_integer("num_cpu_devices", 1, "Split the CPU into N logical devices.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("epochs", 3, "Epochs.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: one pass).", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("grad_accum_steps", 1, "Gradient accumulation steps.", lower_bound=1)
flags.DEFINE_bool("remat", False, "Rematerialize activations (keras.RematScope) to save memory.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_enum("nan_policy", "stop", NAN_POLICIES, "What NanMonitor does on divergence.")
flags.DEFINE_string("model_dir", None, "Backups, TensorBoard logs, model.keras and summary.json.")


flags.register_validator(
    "model_dir", lambda d: d is None or not os.path.exists(d) or os.path.isdir(d),
    message="--model_dir must be a directory (it exists and is not one)")


def _alias(name: str, alias: str, default: str) -> str:
    value, other = getattr(FLAGS, name), getattr(FLAGS, alias)
    if value and other and value != other and not (name == "precision" and _same(value, other)):
        cli.fail(f"--{name}={value} and --{alias}={other} disagree; give one of them")
    return value or other or default


def _same(a: str, b: str) -> bool:
    import tfmp

    return "tune" not in (a, b) and tfmp.parse_precision(a) == tfmp.parse_precision(b)


def _validate(precision: str, strategy_name: str) -> None:
    """Every flag (and TFMP_PRECISION) checked before anything is built: one line, exit 2."""
    import tfmp
    from tfmp import loss_scale

    try:
        tfmp.parse_loss_scale(FLAGS.loss_scale)
    except ValueError as e:
        cli.fail(f"--{e}")
    env = os.environ.get(tfmp.ENV_VAR, "").strip()
    if precision == "auto" and env:
        try:
            tfmp.parse_precision(env)
        except ValueError as e:
            cli.fail(f"environment variable {tfmp.ENV_VAR}={env!r}: {e}")
    if not math.isfinite(FLAGS.learning_rate) or FLAGS.learning_rate <= 0:
        cli.fail(f"--learning_rate={FLAGS.learning_rate} must be a positive finite number")
    if FLAGS.growth_interval is not None and FLAGS.growth_interval < 1:
        cli.fail(f"--growth_interval={FLAGS.growth_interval} must be a positive integer")
    low, high = loss_scale.FLOAT32_MIN_NORMAL, loss_scale.FLOAT32_MAX
    for name in ("initial_scale", "min_scale"):
        value = getattr(FLAGS, name)
        if value is not None and not low <= value <= high:
            cli.fail(f"--{name}={value:g} must be a positive number within float32's normal "
                     f"range [{low:.4g}, {high:.4g}]")
    initial = _or(FLAGS.initial_scale, loss_scale.DEFAULT_INITIAL_SCALE)
    floor = _or(FLAGS.min_scale, loss_scale.DEFAULT_MIN_SCALE)
    if initial < floor:
        which = "--min_scale" if FLAGS.initial_scale is None else "--initial_scale"
        cli.fail(f"{which}: --initial_scale={initial:g}{_default(FLAGS.initial_scale)} is below "
                 f"--min_scale={floor:g}{_default(FLAGS.min_scale)}; the loss scale starts "
                 "at or above its floor")
    if tfmp.parse_strategy(strategy_name) == "multi_worker_mirrored":
        from tfmp import training

        try:  # before connecting: the connection waits for every worker
            training.check_cluster_config(precision, tfmp.cluster.read_tf_config())
        except ValueError as e:  # a bad TF_CONFIG, or training.ConfigError
            cli.fail(str(e))
    if FLAGS.tpu and strategy_name not in ("tpu", "auto"):
        cli.fail(f"--tpu={FLAGS.tpu} is only used with --strategy=tpu (or auto); "
                 f"got --strategy={strategy_name}")


def _or(value, default):
    return default if value is None else value


def _default(value) -> str:
    return " (its default)" if value is None else ""


def main(argv: Sequence[str]) -> int:
    precision = _alias("precision", "dtype", "auto")
    strategy_name = _alias("strategy", "distribution_strategy", "auto")
    import tfmp
    from tfmp import data as tfmp_data
    from tfmp import training

    _validate(precision, strategy_name)
    try:
        if FLAGS.num_cpu_devices > 1:
            tfmp.split_cpu(FLAGS.num_cpu_devices)
        strategy = tfmp.get_strategy(strategy_name, FLAGS.tpu, FLAGS.cluster_timeout)
    except ValueError as e:
        cli.fail(str(e))
    if FLAGS.batch_size % strategy.num_replicas_in_sync:
        cli.fail(f"--batch_size={FLAGS.batch_size} is not divisible by the "
                 f"{strategy.num_replicas_in_sync} replicas of {type(strategy).__name__}")
    config = training.TrainConfig(**{
        **{f: getattr(FLAGS, f) for f in (
            "model", "dataset", "data_dir", "loss_scale", "initial_scale", "growth_interval",
            "min_scale", "tpu", "num_cpu_devices", "batch_size", "epochs", "steps_per_epoch",
            "learning_rate", "grad_accum_steps", "remat", "jit_compile", "seed", "tune_steps",
            "nan_policy",
            "model_dir")},
        "precision": precision, "strategy": strategy_name,
    })
    build, kind = models.get(config.model)
    try:
        data = tfmp_data.load(config.dataset, kind, config.batch_size, config.data_dir, config.seed)
        summary = training.train(config, build, data, strategy)
    except (tfmp_data.DatasetError, tfmp.AuditError, training.ConfigError) as e:
        cli.fail(str(e).splitlines()[0])
    except (training.TrainingStopped, tfmp.NonFiniteError) as e:
        kept = f" (backup kept in {FLAGS.model_dir}; rerun to resume)" if FLAGS.model_dir else ""
        cli.fail(f"training stopped on a NaN event{kept}: {e}", cli.EXIT_FINDINGS)
    print(training.human_summary(summary))
    return 0


if __name__ == "__main__":
    cli.run(main)
