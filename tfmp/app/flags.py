"""tfmp's training flags for any absl binary: `tools/train` and the user's own.

`define_flags()` adds the precision, loss-scale, strategy/TPU, NaN-policy, float32-layers,
XLA, training and run-directory flags, with the names `tools/train` uses and Model Garden's
aliases (`--dtype`, `--distribution_strategy`; `--loss_scale` and `--tpu` are the same names).
Then either `train(build_model, make_data)` runs tfmp's training job on the user's model and
data (resume after a kill, `summary.json`, TensorBoard, the NaN stop, `--precision=tune`), or
`Job.from_flags()` hands the pieces to the user's own loop: the strategy, the policy, the
prepared model and optimizer, the callbacks.

Example (a whole binary; `python my_train.py --dtype=bf16 --model_dir=runs/a`):

    import keras
    from tfmp.app import flags as tfmp_flags

    tfmp_flags.define_flags()

    def build_model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

    def make_data(batch_size, input_context=None):
        ...  # a tf.data.Dataset of (x, y) batches (see tfmp.app.user_data)

    if __name__ == "__main__":
        tfmp_flags.run(lambda argv: tfmp_flags.train(build_model, make_data))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import keras
import tensorflow as tf
from absl import flags

from tfmp._messages import first_line
from tfmp.app import cli, flag_table, run_dir, training, user_data
from tfmp.app.config import ConfigError, TrainConfig, weights_fit
from tfmp.app.data import DatasetError, input_kind
from tfmp.app.flag_table import AS_IS, LISTS, MODEL_AND_DATA
from tfmp.app.sources import (ModelSource, References, SourceError, from_callable,
                              parse_model_args, resolve_model)
from tfmp.callbacks import BackupError, NonFiniteError
from tfmp.distribute import get_strategy, split_cpu
from tfmp.distribute.cluster import write_dirs
from tfmp.distribute.multi_worker import in_multi_worker_mode
from tfmp.precision import detect_hardware, resolve_policy, set_policy
from tfmp.precision.policy import parse_precision
from tfmp.preparation import AuditError, prepare

__all__ = ["Job", "TrainConfig", "config_from_flags", "define_flags", "run", "train"]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, *, model_and_data: bool = False,
                 references: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
    """Defines tfmp's training flags in `flag_values`.

    Args:
        flag_values: Where (absl's global `FLAGS` by default).
        model_and_data: Also `--model`, `--model_args`, `--import_modules`, `--data` (alias
            `--dataset`), `--data_dir`, `--train_split` and `--eval_split` (tools/train; a
            binary that builds its own model and data leaves them out).
        references: Reference model names `--model` accepts (default: none; `--model` then
            has no default).
        exclude: Flags the binary defines itself (e.g. `batch_size`): not defined here; the
            job takes `TrainConfig`'s default, or what is given to `config_from_flags`.

    Raises:
        ValueError: an `exclude` entry that is not one of tfmp's flags.
    """
    definitions = flag_table.definitions(flag_values, references)
    unknown = sorted(set(exclude) - set(definitions))
    if unknown:
        raise ValueError(f"exclude={unknown}: not tfmp flags; accepted: "
                         f"{', '.join(sorted(definitions))}")
    for name, define in definitions.items():
        if name not in exclude and (model_and_data or name not in MODEL_AND_DATA):
            define()
    if "model_dir" not in exclude:
        flags.register_validator(
            "model_dir", lambda d: d is None or not os.path.exists(d) or os.path.isdir(d),
            message="--model_dir must be a directory (it exists and is not one)",
            flag_values=flag_values)


# tfmp's errors about the input: one line and exit 2 in a binary.
ONE_LINE_ERRORS = (ConfigError, SourceError, DatasetError, AuditError, run_dir.RunDirError)


def _value(flag_values: flags.FlagValues, name: str) -> Any:
    return flag_values[name].value if name in flag_values else None


def _alias(flag_values: flags.FlagValues, name: str, alias: str) -> Optional[str]:
    value, other = _value(flag_values, name), _value(flag_values, alias)
    if value and other and value != other and not (name == "precision" and _same(value, other)):
        raise ConfigError(f"--{name}={value} and --{alias}={other} disagree; give one of them")
    return value or other


def _same(a: str, b: str) -> bool:
    return "tune" not in (a, b) and parse_precision(a) == parse_precision(b)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS, **overrides: Any) -> TrainConfig:
    """The parsed flags as a `TrainConfig` (Model Garden's aliases resolved), not yet checked.

    Args:
        flag_values: Parsed flags (`define_flags`).
        **overrides: `TrainConfig` fields the binary sets itself (e.g. `batch_size` from its
            own flag); they win over the flags.

    Returns:
        The configuration; `TrainConfig.check()` refuses bad values.

    Raises:
        ConfigError: an alias and its flag disagree (`--dtype=fp16 --precision=bf16`).
        TypeError: an override that is not a `TrainConfig` field.
    """
    values = {name: _value(flag_values, name) for name in AS_IS if name in flag_values}
    values.update({name: tuple(_value(flag_values, name) or ()) for name in LISTS
                   if name in flag_values})
    values = {k: v for k, v in values.items() if v is not None}
    for name, alias in (("precision", "dtype"), ("strategy", "distribution_strategy"),
                        ("dataset", "data")):
        value = _alias(flag_values, name, alias)
        if value is not None:
            values[name] = value
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"config_from_flags got {unknown}: not TrainConfig fields")
    return TrainConfig(**{**values, **overrides})


def _strategy(config: TrainConfig, flag_values: flags.FlagValues) -> tf.distribute.Strategy:
    config.check()  # every flag (and TFMP_PRECISION) before anything is built
    timeout = _value(flag_values, "cluster_timeout")
    try:
        if config.num_cpu_devices > 1:
            split_cpu(config.num_cpu_devices)
        strategy = get_strategy(config.strategy, config.tpu,
                                120.0 if timeout is None else timeout)
    except ValueError as e:  # TensorFlow already started, no TPU there, no cluster
        raise ConfigError(first_line(e)) from None
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(f"--batch_size={config.batch_size} is not divisible by the "
                          f"{strategy.num_replicas_in_sync} replicas of {type(strategy).__name__}")
    return strategy


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def _model_source(config: TrainConfig, build_model: Optional[Callable[[], keras.Model]],
                  references: Optional[References],
                  flag_values: flags.FlagValues) -> ModelSource:
    if build_model is not None:
        return from_callable(build_model, config.model, label=f"the model function {config.model}")
    if "model" not in flag_values:
        raise ConfigError("this binary defines no --model flag: give tfmp.app.flags.train the "
                          "function that builds the model (build_model=)")
    if not config.model:
        raise ConfigError("--model is required: give package.module:function (returning a "
                          "Keras model) or a .keras file")
    return resolve_model(config.model, parse_model_args(config.model_args), references or {})


def _data(config: TrainConfig, source: ModelSource, make_data: Optional[Callable[..., Any]],
          strategy: tf.distribute.Strategy) -> Any:
    several = in_multi_worker_mode(strategy)
    if make_data is not None:
        return user_data.from_function(make_data, config.batch_size, several)
    kind = source.input_kind
    if kind is None and not user_data.is_user_data(config.dataset):
        try:  # synthetic or tfds data, made for the kind of input the user's model takes
            kind = input_kind(source.build({}))
        except DatasetError as e:
            raise DatasetError(f"--data={config.dataset} is made for the model's inputs, which "
                               f"cannot be read off it ({e}): give --data") from None
    return user_data.load_data(config.dataset, kind, config.batch_size, config.data_dir,
                               config.seed, several, (config.train_split, config.eval_split))


def train(build_model: Optional[Callable[[], keras.Model]] = None,
          make_data: Optional[Callable[..., Any]] = None, *,
          flag_values: flags.FlagValues = flags.FLAGS,
          references: Optional[References] = None, **overrides: Any) -> int:
    """Runs tfmp's training job on the parsed flags and prints its summary.

    Args:
        build_model: Returns a new Keras model, compiled or not (a compiled one keeps its
            loss, metrics and optimizer; else `--loss` is needed). Default: what `--model`
            names (`define_flags(model_and_data=True)`).
        make_data: A data function (`tfmp.app.user_data`: `fn(batch_size, input_context=None)`
            returning a dataset or a `(train, eval)` pair). Default: what `--data` names.
        flag_values: The parsed flags.
        references: Reference models `--model` may name: name -> `(build, input_kind)`.
        **overrides: `TrainConfig` fields set by the binary (see `config_from_flags`).

    Returns:
        0 (the binary's exit code).

    Raises:
        tfmp.app.cli.ToolError: bad input (exit 2), or training stopped on a NaN event
            (exit 1); `run` prints it as one line.
    """
    if build_model is not None:
        overrides.setdefault("model", _name(build_model))
    try:
        config = config_from_flags(flag_values, **overrides)
        strategy = _strategy(config, flag_values)
        cli.import_modules(config.import_modules)
        source = _model_source(config, build_model, references, flag_values)
        summary = _run_job(config, source, _data(config, source, make_data, strategy), strategy)
    except ONE_LINE_ERRORS as e:
        cli.fail(first_line(e))
    print(training.human_summary(summary))
    return 0


def _run_job(config: TrainConfig, source: ModelSource, data: Any,
             strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """`training.train`, what stops it said in one line (`ToolError`)."""
    try:
        return training.train(config, source, data, strategy)
    except BackupError as e:  # found when fit restores: a backup of another model
        cli.fail(f"{e}; {run_dir.RESTART_HINT}")
    except OSError as e:  # a full disk, a file-size limit, a directory that went away
        kept = (f"; what {config.model_dir} held is intact: rerun to resume from its last "
                "complete backup" if config.model_dir else "")
        cli.fail(f"I/O error: {cli.describe_os_error(e)}{kept}")
    except (training.TrainingStopped, NonFiniteError) as e:
        kept = f" (backup kept in {config.model_dir}; rerun to resume)" if config.model_dir else ""
        cli.fail(f"training stopped on a NaN event{kept}: {e}", cli.EXIT_FINDINGS)




def run(main: Callable[[Sequence[str]], int], positional: bool = False) -> None:
    """`absl.app.run(main)` where tfmp's errors about the input (`ONE_LINE_ERRORS`, and
    `tfmp.app.cli.ToolError`) are one line on stderr and exit 2 (1: a NaN stop).

    Args:
        main: The binary's main (`main(argv) -> exit code`).
        positional: Accept positional arguments (refused by default).
    """
    def one_line(argv: Sequence[str]) -> int:
        try:
            return main(argv)
        except ONE_LINE_ERRORS as e:
            cli.fail(first_line(e))

    cli.run(one_line, positional)


@dataclasses.dataclass(frozen=True)
class Job:
    """The pieces of tfmp's training job, from the flags, for a binary with its own loop.

    Attributes:
        config: The checked configuration.
        strategy: The distribution strategy (`--strategy`/`--distribution_strategy`, `--tpu`).
        policy: The global dtype policy, set (`--precision`/`--dtype`).
        hardware: What the policy was chosen for.

    Example:
        >>> job = Job.from_flags()
        >>> with job.strategy.scope():
        ...     model, optimizer = job.prepare(build_model(), keras.optimizers.Adam())
        ...     model.compile(optimizer, "mse", jit_compile=job.config.jit_compile)
        >>> model.fit(ds, epochs=job.config.epochs, callbacks=job.callbacks())
    """

    config: TrainConfig
    strategy: tf.distribute.Strategy
    policy: str
    hardware: Any

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS, **overrides: Any) -> "Job":
        """Checks the flags, makes the strategy and sets the policy.

        Args:
            flag_values: The parsed flags (`define_flags`).
            **overrides: `TrainConfig` fields set by the binary.

        Returns:
            The `Job`.

        Raises:
            ConfigError: a bad flag value, or `--precision=tune` (which `train` runs).
        """
        config = config_from_flags(flag_values, **overrides)
        if config.precision == "tune":
            raise ConfigError("--precision=tune measures the model in tfmp's training job: run "
                              "it with tfmp.app.flags.train, or give a policy")
        strategy = _strategy(config, flag_values)
        hardware = detect_hardware(strategy)
        policy = set_policy(resolve_policy(config.precision, hardware), hardware)
        return cls(config, strategy, policy, hardware)

    def prepare(self, model: keras.Model, optimizer: Any,
                calibration_data: Any = None) -> tuple[keras.Model, keras.optimizers.Optimizer]:
        """`tfmp.prepare` with the flags' loss scale, float32 layers and weights' dtype, and
        the NaN guard on (a non-finite step is skipped, never applied). Call it in
        `strategy.scope()`.

        Args:
            model: The model, built.
            optimizer: A Keras optimizer (or its name).
            calibration_data: A few training batches (`--float32_layers=auto` needs them).

        Returns:
            `(model, optimizer)` to compile with.
        """
        config = self.config
        return prepare(model, optimizer, self.policy, loss_scale=config.loss_scale, guard=True,
                       hardware=self.hardware, float32_layers=config.float32_layer_list(),
                       calibration_data=calibration_data,
                       weights_dtype=weights_fit(config.weights_dtype, self.policy),
                       **config.scale_args())

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """`LossScaleMonitor` and `NanMonitor`; with `--model_dir`, the backup a rerun resumes
        from (checked first: a damaged one raises `RunDirError`; removed when `fit` ends, kept
        after a NaN stop) and TensorBoard."""
        dirs = (write_dirs(self.config.model_dir, run_dir.BACKUP, self.strategy)
                if self.config.model_dir else None)
        resume = training.check_run_dir(self.config, dirs)
        return training.job_callbacks(self.config, dirs, resume is not None,
                                      keep_backup=False)[0]
