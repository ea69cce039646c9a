"""Trains a reference model in mixed precision.

  python -m tools.train                                   # mlp on the synthetic task, precision auto
  python -m tools.train --model=cnn --precision=bf16 --epochs=5 --model_dir=runs/cnn
  python -m tools.train --model=transformer --dataset=imdb_reviews --data_dir=~/tensorflow_datasets
  python -m tools.train --strategy=mirrored --num_cpu_devices=2 --batch_size=256

Re-running a command with the same --model_dir resumes after the last completed epoch; a
damaged backup or tune.json there stops the run with one line (exit 2) unless --restart,
which moves them aside under dated names and starts over.
"""

import os
from typing import Sequence

from absl import flags

import models
import tfmp
from tfmp.app import cli, run_dir, training
from tfmp.app.config import ConfigError, TrainConfig
from tfmp.app.data import DatasetError, load as load_data
from tfmp.callbacks import NAN_POLICIES, BackupError
from tfmp.distribute import STRATEGIES as _CANONICAL_STRATEGIES
from tfmp.precision import ACCEPTED_NAMES, parse_precision

FLAGS = flags.FLAGS
MODELS = tuple(models.REGISTRY)
STRATEGIES = (*_CANONICAL_STRATEGIES, "off")  # Model Garden's name for default
PRECISIONS = (*ACCEPTED_NAMES, "tune")
# The flags TrainConfig holds as they are (precision and strategy come with their aliases).
CONFIG_FLAGS = ("model", "dataset", "data_dir", "loss_scale", "initial_scale", "growth_interval",
                "min_scale", "tpu", "num_cpu_devices", "batch_size", "epochs", "steps_per_epoch",
                "learning_rate", "grad_accum_steps", "remat", "jit_compile", "seed", "tune_steps",
                "nan_policy", "model_dir", "restart", "float32_layers", "weights_dtype")

flags.DEFINE_enum("model", "mlp", MODELS, "Reference model.")
flags.DEFINE_string("dataset", "synthetic", "'synthetic' or a tensorflow-datasets name.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_enum("precision", None, PRECISIONS, "Precision policy (default auto; any case). "
                  "tune: time float32 and each 16-bit policy, each with and without XLA, on this "
                  "model and batch first (tfmp.tune) and train with the fastest that passes.",
                  case_sensitive=False)
flags.DEFINE_integer("tune_steps", 20, "Steps per configuration that --precision=tune measures.",
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
                   "worker in TF_CONFIG before giving up (one line, exit 2).")
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
flags.DEFINE_string("float32_layers", None, "Layers to keep in float32 beside outputs, softmax "
                    "and normalization: 'auto' (tfmp.locate_overflows on 8 training batches "
                    "under a 16-bit policy) or comma-separated layer names or paths.")
flags.DEFINE_string("weights_dtype", None, "Store the weights of the layers that compute in 16 "
                    "bits in 16 bits (bfloat16 with --precision=bf16, float16 with fp16): half "
                    "the weight memory, the optimizer compensated (tfmp.compensate) so small "
                    "updates are not lost. Default: float32 weights.")
flags.DEFINE_bool("restart", False, "Start the --model_dir's run over: move its backup/ and "
                  "tune.json aside under dated names (nothing is deleted) instead of resuming.")


flags.register_validator(
    "model_dir", lambda d: d is None or not os.path.exists(d) or os.path.isdir(d),
    message="--model_dir must be a directory (it exists and is not one)")


def _alias(name: str, alias: str, default: str) -> str:
    value, other = getattr(FLAGS, name), getattr(FLAGS, alias)
    if value and other and value != other and not (name == "precision" and _same(value, other)):
        cli.fail(f"--{name}={value} and --{alias}={other} disagree; give one of them")
    return value or other or default


def _same(a: str, b: str) -> bool:
    return "tune" not in (a, b) and parse_precision(a) == parse_precision(b)


def main(argv: Sequence[str]) -> int:
    config = TrainConfig(**{
        **{f: getattr(FLAGS, f) for f in CONFIG_FLAGS},
        "precision": _alias("precision", "dtype", "auto"),
        "strategy": _alias("strategy", "distribution_strategy", "auto"),
    })
    try:
        config.check()  # every flag (and TFMP_PRECISION) before anything is built
        if config.num_cpu_devices > 1:
            tfmp.split_cpu(config.num_cpu_devices)
        strategy = tfmp.get_strategy(config.strategy, config.tpu, FLAGS.cluster_timeout)
    except ValueError as e:  # ConfigError, or what get_strategy refuses
        cli.fail(str(e))
    if config.batch_size % strategy.num_replicas_in_sync:
        cli.fail(f"--batch_size={config.batch_size} is not divisible by the "
                 f"{strategy.num_replicas_in_sync} replicas of {type(strategy).__name__}")
    build, kind = models.get(config.model)
    try:
        data = load_data(config.dataset, kind, config.batch_size, config.data_dir, config.seed)
        summary = training.train(config, build, data, strategy)
    except (DatasetError, tfmp.AuditError, ConfigError, run_dir.RunDirError) as e:
        cli.fail(str(e).splitlines()[0])
    except BackupError as e:  # found when fit restores: a backup of another model
        cli.fail(f"{e}; {run_dir.RESTART_HINT}")
    except OSError as e:  # a full disk, a file-size limit, a directory that went away
        kept = (f"; what {config.model_dir} held is intact: rerun to resume from its last "
                "complete backup" if config.model_dir else "")
        cli.fail(f"I/O error: {cli.describe_os_error(e)}{kept}")
    except (training.TrainingStopped, tfmp.NonFiniteError) as e:
        kept = f" (backup kept in {config.model_dir}; rerun to resume)" if config.model_dir else ""
        cli.fail(f"training stopped on a NaN event{kept}: {e}", cli.EXIT_FINDINGS)
    print(training.human_summary(summary))
    return 0


if __name__ == "__main__":
    cli.run(main)
