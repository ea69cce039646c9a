"""The training job's configuration (the binary's flags) and every check made before anything is built.

`TrainConfig.check()` refuses bad values and combinations with one line naming
the flag (`ConfigError`), so that `tools/train` only parses flags; `check_config`
adds what depends on the strategy once it exists.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import keras
import tensorflow as tf

from tfmp.distribute.cluster import Cluster, read_tf_config
from tfmp.distribute.strategies import parse_strategy, xla_refusal
from tfmp.precision.policy import ENV_VAR, parse_precision
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.scaling.half_weights import SEVERAL_WORKERS, checked_weights_dtype
from tfmp.scaling.arguments import (DEFAULT_INITIAL_SCALE, DEFAULT_MIN_SCALE, FLOAT32_MAX,
                                    FLOAT32_MIN_NORMAL)
from tfmp.scaling.wrapping import parse_loss_scale


class ConfigError(ValueError):
    """A bad value, or a combination of settings known not to work; the message is one line."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is parameterized by: the binary's flags, checked (`check`).

    Attributes:
        One per `tools.train` flag, of the same name (`--dataset` is `dataset`, Model
        Garden's aliases resolved), with the flag's default: docs/binaries.md lists them,
        `tfmp.app.flag_table` defines them. `dataclasses.replace(config, ...)` changes one.
    """

    model: str = "mlp"  # a reference name, package.module:function or a .keras file
    model_args: Optional[str] = None  # JSON or key=value,...
    import_modules: tuple[str, ...] = ()
    loss: Optional[str] = None  # a Keras loss name (else the model's own, or the reference's)
    metrics: tuple[str, ...] = ()
    optimizer: Optional[str] = None  # a Keras optimizer name (else the model's own, or Adam)
    dataset: str = "synthetic"  # also an .npz file or package.module:function
    train_split: str = "train"  # tensorflow-datasets splits
    eval_split: Optional[str] = None  # None: test, else validation, else 1000 held out
    data_dir: Optional[str] = None
    precision: str = "auto"
    loss_scale: str = "dynamic"
    initial_scale: Optional[float] = None
    growth_interval: Optional[int] = None
    min_scale: Optional[float] = None
    strategy: str = "auto"
    tpu: Optional[str] = None
    num_cpu_devices: int = 1
    batch_size: int = 128
    epochs: int = 3
    steps_per_epoch: Optional[int] = None
    learning_rate: Optional[float] = None  # None: 1e-3, or a compiled model's optimizer's own
    grad_accum_steps: int = 1
    remat: bool = False
    jit_compile: bool = False
    seed: int = 0
    tune_steps: int = 20
    nan_policy: str = "stop"
    model_dir: Optional[str] = None
    restart: bool = False
    float32_layers: Optional[str] = None  # "auto" or comma-separated layer names/paths
    weights_dtype: Optional[str] = None  # "bfloat16" / "float16": 16-bit weights (compensated)

    def float32_layer_list(self) -> Any:
        """`float32_layers` for `tfmp.prepare`: `"auto"`, a list of names, or `()`."""
        if not self.float32_layers:
            return ()
        if self.float32_layers.strip().lower() == "auto":
            return "auto"
        return [name.strip() for name in self.float32_layers.split(",")]

    def scale_args(self) -> dict[str, Any]:
        args = {"initial_scale": self.initial_scale, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale}
        """The loss-scale arguments given (for `tfmp.wrap_optimizer`)."""
        return {k: v for k, v in args.items() if v is not None}

    def check(self) -> None:
        """Every setting (and `TFMP_PRECISION`) checked before anything is built.

        Raises:
            ConfigError: the first bad value or combination, in one line naming the flag.
        """
        try:
            parse_loss_scale(self.loss_scale)
        except ValueError as e:
            raise ConfigError(f"--{e}") from None
        env = os.environ.get(ENV_VAR, "").strip()
        if self.precision == "auto" and env:
            try:
                parse_precision(env)
            except ValueError as e:
                raise ConfigError(f"environment variable {ENV_VAR}={env!r}: {e}") from None
        layers = self.float32_layer_list()
        if layers != "auto" and any(not name for name in layers):
            raise ConfigError(f"--float32_layers={self.float32_layers!r}: give 'auto' or layer "
                              "names or paths separated by commas (no empty entry)")
        self._check_weights_dtype()
        if self.restart and not self.model_dir:
            raise ConfigError("--restart starts a --model_dir's run over; give --model_dir")
        rate = self.learning_rate
        if rate is not None and (not math.isfinite(rate) or rate <= 0):
            raise ConfigError(f"--learning_rate={rate} must be a positive finite number")
        self._check_names()
        if self.growth_interval is not None and self.growth_interval < 1:
            raise ConfigError(f"--growth_interval={self.growth_interval} must be a positive "
                              "integer")
        self._check_scales()
        strategy = parse_strategy(self.strategy)
        if strategy == "multi_worker_mirrored":  # before connecting: that waits for every worker
            try:
                check_cluster_config(self.precision, read_tf_config(), self.weights_dtype)
            except ValueError as e:  # a bad TF_CONFIG, or ConfigError
                raise ConfigError(str(e)) from None
        if self.tpu and strategy not in ("tpu", "auto"):
            raise ConfigError(f"--tpu={self.tpu} is only used with --strategy=tpu (or auto); "
                              f"got --strategy={self.strategy}")

    def _check_names(self) -> None:
        if self.optimizer:
            optimizer_class(self.optimizer)
        for kind, names in (("loss", (self.loss,) if self.loss else ()),
                            ("metrics", self.metrics)):
            for name in names:
                try:
                    (keras.losses.get if kind == "loss" else keras.metrics.get)(name)
                except (ValueError, TypeError):
                    raise ConfigError(f"--{kind}: {name!r} is not a Keras {kind} name (e.g. "
                                      f"{_EXAMPLES[kind]})") from None

    def _check_weights_dtype(self) -> None:
        value = self.weights_dtype
        if value is None:
            return
        if value not in HALF_DTYPES:
            raise ConfigError(f"--weights_dtype={value!r} is not accepted: {WEIGHTS_HELP}")
        if self.precision == "tune":
            raise ConfigError(f"--weights_dtype={value} with --precision=tune: tune chooses the "
                              "weights' dtype too (its bf16w candidate); give --precision=bf16 "
                              "or fp16, or leave --weights_dtype out")
        if self.precision != "auto":
            weights_fit(value, parse_precision(self.precision))

    def _check_scales(self) -> None:
        for name in ("initial_scale", "min_scale"):
            value = getattr(self, name)
            if value is not None and not FLOAT32_MIN_NORMAL <= value <= FLOAT32_MAX:
                raise ConfigError(
                    f"--{name}={value:g} must be a positive number within float32's normal "
                    f"range [{FLOAT32_MIN_NORMAL:.4g}, {FLOAT32_MAX:.4g}]")
        initial = DEFAULT_INITIAL_SCALE if self.initial_scale is None else self.initial_scale
        floor = DEFAULT_MIN_SCALE if self.min_scale is None else self.min_scale
        if initial < floor:
            which = "--min_scale" if self.initial_scale is None else "--initial_scale"
            raise ConfigError(
                f"{which}: --initial_scale={initial:g}{_default(self.initial_scale)} is below "
                f"--min_scale={floor:g}{_default(self.min_scale)}; the loss scale starts at or "
                "above its floor")


DEFAULT_LEARNING_RATE = 1e-3
_EXAMPLES = {"loss": "sparse_categorical_crossentropy, binary_crossentropy, mse",
             "metrics": "accuracy, sparse_categorical_accuracy, mae, auc"}


def _optimizer_classes() -> dict[str, type]:
    return {name.lower(): cls for name, cls in vars(keras.optimizers).items()
            if isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)
            and cls is not keras.optimizers.Optimizer
            and not issubclass(cls, keras.optimizers.LossScaleOptimizer)}


def optimizer_class(name: str) -> type:
    """The Keras optimizer class `--optimizer` names (any case: adam, adamw, sgd, ...).

    Raises:
        ConfigError: no Keras optimizer has that name; the message lists them.
    """
    classes = _optimizer_classes()
    if name.lower() not in classes:
        raise ConfigError(f"--optimizer={name!r} is not a Keras optimizer: give one of "
                          f"{', '.join(sorted(classes))}")
    return classes[name.lower()]


WEIGHTS_HELP = ("bfloat16 with --precision=bf16 (mixed_bfloat16), float16 with --precision=fp16 "
                "(mixed_float16), or leave it out for float32 weights")


def weights_fit(weights_dtype: Optional[str], policy: str) -> Optional[str]:
    """`--weights_dtype` checked against the run's policy (`tfmp.prepare`'s `weights_dtype`).

    Raises:
        ConfigError: the policy does not compute in that dtype (float32 included).
    """
    try:
        return checked_weights_dtype(weights_dtype, policy)
    except ValueError:
        compute = keras.dtype_policies.get(policy).compute_dtype
        raise ConfigError(f"--weights_dtype={weights_dtype} does not fit the policy {policy} "
                          f"(it computes in {compute}): {WEIGHTS_HELP}") from None


def _default(value: Any) -> str:
    return " (its default)" if value is None else ""


def check_config(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
    """Rejects combinations Keras 3.15 cannot run under `strategy`, before anything is built.

    Args:
        config: The run's configuration.
        strategy: The strategy it will run under.

    Raises:
        ConfigError: `jit_compile` with a multi-replica MirroredStrategy (a graph
            execution error on CPU in every precision; keras#21366 on GPU).
    """
    refusal = xla_refusal(strategy) if config.jit_compile else None
    if refusal:
        raise ConfigError(f"--jit_compile {refusal}: drop --jit_compile or use one device")


def check_cluster_config(precision: str, cluster: Optional[Cluster],
                         weights_dtype: Optional[str] = None) -> None:
    """Rejects what cannot run across the workers of a cluster, before connecting.

    Args:
        precision: The precision asked for (`tune` included).
        cluster: The cluster from `TF_CONFIG`, or None.
        weights_dtype: `--weights_dtype`.

    Raises:
        ConfigError: `precision="tune"` with several workers (each would measure on its own
            and might choose another policy); bfloat16 weights with several workers
            (`tfmp.scaling.half_weights.SEVERAL_WORKERS`).
    """
    several = cluster is not None and cluster.num_workers > 1
    if several and weights_dtype == "bfloat16":
        raise ConfigError(f"--weights_dtype=bfloat16 with {cluster.num_workers} workers: "
                          f"{SEVERAL_WORKERS}")
    if several and precision == "tune":
        raise ConfigError("--precision=tune measures on one process; every worker of a cluster "
                          "must train with the same policy: tune on one machine, then pass it")


