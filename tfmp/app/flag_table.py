"""Every tfmp training flag, defined once (`tfmp.app.flags.define_flags` defines them)."""

from __future__ import annotations

from typing import Callable, Sequence

from absl import flags

from tfmp.app import cli
from tfmp.callbacks.monitors import NAN_POLICIES
from tfmp.distribute.strategies import STRATEGIES as _CANONICAL_STRATEGIES
from tfmp.precision.policy import ACCEPTED_NAMES

STRATEGIES = (*_CANONICAL_STRATEGIES, "off")  # Model Garden's name for default
PRECISIONS = (*ACCEPTED_NAMES, "tune")
# Flags TrainConfig holds as they are (precision, strategy and data come with their aliases).
AS_IS = ("loss_scale", "initial_scale", "growth_interval", "min_scale", "tpu",
          "num_cpu_devices", "batch_size", "epochs", "steps_per_epoch", "learning_rate",
          "grad_accum_steps", "remat", "jit_compile", "seed", "tune_steps", "nan_policy",
          "model_dir", "restart", "float32_layers", "weights_dtype", "optimizer", "loss",
          "model", "model_args", "data_dir", "train_split", "eval_split")
LISTS = ("metrics", "import_modules")
MODEL_AND_DATA = ("model", "model_args", "import_modules", "data", "dataset", "data_dir",
                  "train_split", "eval_split")


def definitions(flag_values: flags.FlagValues, references: Sequence[str]) -> dict[str, Callable]:
    """Each flag's definition, by name: called, it defines the flag in `flag_values`.

    Args:
        flag_values: Where the flags go.
        references: The reference model names `--model` accepts (none: `--model` has no
            default).

    Returns:
        `{flag name: a function of no argument that defines it}`.
    """
    fv = {"flag_values": flag_values}
    model_help = ("Model: " + (", ".join(references) + ", " if references else "") +
                  "package.module:function (returning a Keras model, compiled or not) or a "
                  ".keras file (loaded in safe mode).")
    return {
        "model": lambda: flags.DEFINE_string("model", "mlp" if references else None, model_help,
                                             **fv),
        "model_args": lambda: flags.DEFINE_string(
            "model_args", None, "Keyword arguments of --model's function: JSON or "
            "key=value,... (a reference model: its builder's, e.g. hidden=[64])", **fv),
        "import_modules": lambda: flags.DEFINE_list("import_modules", [], cli.IMPORT_MODULES_HELP,
                                                    **fv),
        "data": lambda: flags.DEFINE_string(
            "data", None, "Data: 'synthetic', a tensorflow-datasets name, an .npz file (x, y, "
            "optionally x_eval, y_eval, sample_weight) or package.module:function (returning a "
            "tf.data.Dataset or a (train, eval) pair; tfmp.app.user_data).", **fv),
        "dataset": lambda: flags.DEFINE_string("dataset", None, "Alias of --data.", **fv),
        "data_dir": lambda: flags.DEFINE_string("data_dir", None,
                                                "tensorflow-datasets data directory.", **fv),
        "train_split": lambda: flags.DEFINE_string(
            "train_split", "train", "tensorflow-datasets split to train on (a slice too: "
            "train[:90%]).", **fv),
        "eval_split": lambda: flags.DEFINE_string(
            "eval_split", None, "tensorflow-datasets split to evaluate on (default: test, else "
            "validation, else 1000 examples held out of the training split).", **fv),
        "loss": lambda: flags.DEFINE_string(
            "loss", None, "A Keras loss name (default: the compiled model's own; reference "
            "models: sparse categorical cross-entropy on logits).", **fv),
        "metrics": lambda: flags.DEFINE_list("metrics", [], "Keras metric names (default: "
                                             "the compiled model's own, or accuracy).", **fv),
        "optimizer": lambda: flags.DEFINE_string(
            "optimizer", None, "A Keras optimizer name: adam, adamw, sgd, ... (default: the "
            "compiled model's own, else adam).", **fv),
        "precision": lambda: flags.DEFINE_enum(
            "precision", None, PRECISIONS, "Precision policy (default auto; any case). tune: "
            "time float32 and each 16-bit policy, each with and without XLA, on this model and "
            "batch first (tfmp.tune) and train with the fastest that passes.",
            case_sensitive=False, **fv),
        "dtype": lambda: flags.DEFINE_enum("dtype", None, ("fp16", "bf16", "fp32"),
                                           "Model Garden alias of --precision.",
                                           case_sensitive=False, **fv),
        "tune_steps": lambda: flags.DEFINE_integer(
            "tune_steps", 20, "Steps per configuration that --precision=tune measures.",
            lower_bound=3, **fv),
        "loss_scale": lambda: flags.DEFINE_string(
            "loss_scale", "dynamic", "'dynamic' or a positive number (float16 only).", **fv),
        "initial_scale": lambda: flags.DEFINE_float("initial_scale", None,
                                                    "Initial loss scale (float16).", **fv),
        "growth_interval": lambda: flags.DEFINE_integer(
            "growth_interval", None, "Clean steps before the loss scale grows.", **fv),
        "min_scale": lambda: flags.DEFINE_float("min_scale", None,
                                                "Floor of the loss scale (default 1).", **fv),
        "strategy": lambda: flags.DEFINE_enum("strategy", None, STRATEGIES,
                                              "Distribution strategy (default auto).", **fv),
        "distribution_strategy": lambda: flags.DEFINE_enum(
            "distribution_strategy", None, STRATEGIES, "Model Garden alias of --strategy.", **fv),
        "tpu": lambda: flags.DEFINE_string("tpu", None, "TPU address, or 'local' on a TPU VM.",
                                           **fv),
        "cluster_timeout": lambda: flags.DEFINE_float(
            "cluster_timeout", 120.0, "multi_worker_mirrored: seconds to wait for every worker "
            "in TF_CONFIG before giving up (one line, exit 2).", **fv),
        "num_cpu_devices": lambda: flags.DEFINE_integer(
            "num_cpu_devices", 1, "Split the CPU into N logical devices.", lower_bound=1, **fv),
        "batch_size": lambda: flags.DEFINE_integer("batch_size", 128, "Global batch size.",
                                                   lower_bound=1, **fv),
        "epochs": lambda: flags.DEFINE_integer("epochs", 3, "Epochs.", lower_bound=1, **fv),
        "steps_per_epoch": lambda: flags.DEFINE_integer(
            "steps_per_epoch", None, "Steps per epoch (default: one pass).", lower_bound=1, **fv),
        "learning_rate": lambda: flags.DEFINE_float(
            "learning_rate", None, "Learning rate (default 1e-3, or the compiled model's "
            "optimizer's own).", **fv),
        "grad_accum_steps": lambda: flags.DEFINE_integer(
            "grad_accum_steps", 1, "Gradient accumulation steps.", lower_bound=1, **fv),
        "remat": lambda: flags.DEFINE_bool(
            "remat", False, "Rematerialize activations (keras.RematScope) to save memory.", **fv),
        "jit_compile": lambda: flags.DEFINE_bool("jit_compile", False,
                                                 "Compile the train step with XLA.", **fv),
        "seed": lambda: flags.DEFINE_integer("seed", 0, "Random seed.", **fv),
        "nan_policy": lambda: flags.DEFINE_enum("nan_policy", "stop", NAN_POLICIES,
                                                "What NanMonitor does on divergence.", **fv),
        "model_dir": lambda: flags.DEFINE_string(
            "model_dir", None, "Backups, TensorBoard logs, model.keras and summary.json.", **fv),
        "float32_layers": lambda: flags.DEFINE_string(
            "float32_layers", None, "Layers to keep in float32 beside outputs, softmax and "
            "normalization: 'auto' (tfmp.locate_overflows on 8 training batches under a 16-bit "
            "policy) or comma-separated layer names or paths.", **fv),
        "weights_dtype": lambda: flags.DEFINE_string(
            "weights_dtype", None, "Store the weights of the layers that compute in 16 bits in "
            "16 bits (bfloat16 with --precision=bf16, float16 with fp16): half the weight "
            "memory, the optimizer compensated (tfmp.compensate) so small updates are not "
            "lost. Default: float32 weights.", **fv),
        "restart": lambda: flags.DEFINE_bool(
            "restart", False, "Start the --model_dir's run over: move its backup/ and tune.json "
            "aside under dated names (nothing is deleted) instead of resuming.", **fv),
    }
