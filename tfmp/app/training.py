"""The training job behind `python -m tools.train`: config in, model and summary out."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Optional

import keras
import tensorflow as tf
from absl import logging

from tfmp import callbacks as tfmp_callbacks
from tfmp._compat import forget_compilation
from tfmp.app.compiling import Compilation, build_on, check_fit, compilation, describe
from tfmp.app.config import (ConfigError, TrainConfig, check_cluster_config, check_config,
                             weights_fit)
from tfmp.app.data import SYNTHETIC, Data
from tfmp.app.sources import ModelSource
from tfmp.app.summary import COUNTERS, human_summary  # noqa: F401  (human_summary: re-exported)
from tfmp.app.run_dir import (BACKUP, FINAL_MODEL, SUMMARY, TENSORBOARD, TUNED, checked_backup,
                              read_tuned, remove_leftovers, restart)
from tfmp.atomic import atomic_path, write_json, write_json_atomically
from tfmp.callbacks.backup import Checkpoint
from tfmp.distribute.cluster import WriteDirs, read_tf_config, write_dirs
from tfmp.distribute.multi_worker import in_multi_worker_mode
from tfmp.distribute.strategies import xla_refusal
from tfmp.measure import tune
from tfmp.measure.tuning import XLA_ONLY
from tfmp.precision import HardwareInfo, PolicyChoice, detect_hardware, resolve_policy, set_policy
from tfmp.precision.policy import MIXED_FLOAT16
from tfmp.preparation import prepare
from tfmp.rewrite import kept_float32
from tfmp.rewrite.enforcement import layer_matcher

SCALE_FLAGS = ("initial_scale", "growth_interval", "min_scale")
CALIBRATION_BATCHES = 8  # what --float32_layers=auto runs tfmp.locate_overflows on


class TrainingStopped(RuntimeError):
    """Training stopped on a NaN event; the summary and the backup were kept."""


class _Throughput(keras.callbacks.Callback):
    """Samples per second over the epochs after the first (which includes tracing)."""

    def __init__(self, global_batch: int) -> None:
        super().__init__()
        self.global_batch = global_batch
        self.epoch_times: list[tuple[float, int]] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_times.append((time.perf_counter() - self._start, self._steps))

    def samples_per_sec(self) -> float:
        steady = self.epoch_times[1:] or self.epoch_times
        seconds = sum(t for t, _ in steady)
        return sum(n for _, n in steady) * self.global_batch / seconds if seconds else 0.0


def job_callbacks(config: TrainConfig, dirs: Optional[WriteDirs], resume: bool,
                  keep_backup: bool = True) -> tuple[list, Any, Any]:
    """The run's callbacks: `LossScaleMonitor` and `NanMonitor`, and with a run directory
    `SafeBackupAndRestore` (restoring first, so the monitors start from the restored state)
    and TensorBoard.

    Args:
        config: The run's configuration (`nan_policy`, `model_dir`).
        dirs: Where this process writes (`tfmp.distribute.cluster.write_dirs`), or None.
        resume: Whether the backup is restored (`checked_backup` found one).
        keep_backup: Keep the backup when training ends (the job removes it once
            `model.keras` is written); else Keras removes it (not after a NaN stop).

    Returns:
        `(callbacks, the LossScaleMonitor, the NanMonitor)`.
    """
    monitor = tfmp_callbacks.LossScaleMonitor()
    callbacks: list[keras.callbacks.Callback] = [monitor]
    protect = []
    if dirs:
        # Kept when training ends: removed once model.keras and summary.json are written.
        backup = tfmp_callbacks.SafeBackupAndRestore(dirs.backup_dir, restore_dir=dirs.restore_dir,
                                                     restore=resume, delete_checkpoint=not keep_backup)
        protect.append(backup)
        callbacks += [backup, keras.callbacks.TensorBoard(
            os.path.join(dirs.model_dir, TENSORBOARD), update_freq="epoch")]
    nan = tfmp_callbacks.NanMonitor(config.nan_policy, protect=protect)
    return protect + [nan] + [c for c in callbacks if c not in protect], monitor, nan


def as_source(build: Any) -> ModelSource:
    """A `ModelSource`, or a reference-style builder (`build(**Data.model_kwargs())`) as one."""
    if isinstance(build, ModelSource):
        return build
    return ModelSource(getattr(build, "__module__", "model"), lambda kwargs: build(**kwargs),
                       None, True)


def _build_compiled(config: TrainConfig, source: Any, data: Data,
                    policy: str, hardware: Optional[HardwareInfo] = None,
                    jit_compile: bool = False, weights_dtype: Optional[str] = None,
                    ) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """The model built (or loaded) under `policy`, prepared and compiled, the data checked
    against it. `source`: a `ModelSource` (or a reference-style builder, `as_source`)."""
    source = as_source(source)
    # "activations": Keras 3.15 on TensorFlow cannot remat whole layers in graph mode
    # (tf.recompute_grad rejects the keyword arguments layers are called with).
    remat = keras.RematScope(mode="activations") if config.remat else contextlib.nullcontext()
    with remat:
        keras.utils.set_random_seed(config.seed)
        model = source.build(data.model_kwargs())
        compiled = compilation(model, config, source.reference)
        forget_compilation(model)  # prepare may clone it: compiled below with `compiled`
        build_on(model, data)
        # guard=True: under bf16/fp32 too, a non-finite step is skipped, never applied.
        layers = config.float32_layer_list()
        if layers and layers != "auto":
            try:
                layer_matcher(model, layers)
            except ValueError as e:  # a name that is not in this model
                raise ConfigError(f"--{e}") from None
        model, optimizer = prepare(model, compiled.optimizer(), policy, loss_scale=config.loss_scale,
                                   guard=True, hardware=hardware, float32_layers=layers,
                                   calibration_data=data.train.take(CALIBRATION_BATCHES),
                                   weights_dtype=weights_dtype, **config.scale_args())
    compiled.compile(model, optimizer, jit_compile)
    logging.info("tfmp: %s", describe(compiled, optimizer))
    if not (source.reference and data.name == SYNTHETIC):  # else made for each other
        check_fit(model, data, config.batch_size)
    return model, optimizer


def used_scale_flags(optimizer: keras.optimizers.Optimizer,
                     policy: str) -> tuple[str, dict[str, Any]]:
    """How the run scaled the loss, and `SCALE_FLAGS` as its optimizer used them.

    `"dynamic"` (mixed_float16): the three values are read from the optimizer, its
    defaults where a flag was not given. `"fixed"` (mixed_float16, `--loss_scale=N`): the
    scale is N throughout, so `initial_scale` and `min_scale` are N and `growth_interval`
    does not apply (None). `"guard"` (bfloat16, float32): the optimizer is the NaN guard,
    with a fixed scale of 1 (these policies need no loss scaling); none of the three
    applies (None), whatever was given.

    Args:
        optimizer: The run's optimizer (`tfmp.DynamicLossScaleOptimizer`: tools/train
            always guards).
        policy: The run's policy.

    Returns:
        `(mode, {flag: value or None})`.
    """
    if policy != MIXED_FLOAT16:
        return "guard", dict.fromkeys(SCALE_FLAGS)
    used = {name: getattr(optimizer, name) for name in SCALE_FLAGS}
    if not optimizer.dynamic:
        used["growth_interval"] = None
    return ("dynamic" if optimizer.dynamic else "fixed"), used


def check_run_dir(config: TrainConfig, dirs: Optional[WriteDirs]) -> Optional[Checkpoint]:
    """What the run resumes from, checked before anything is measured or trained.

    The chief first removes the temporary files of saves killed mid-write. With
    `config.restart` it moves `backup/` and `tune.json` aside (dated, never deleted) and
    nothing is resumed; so it does with a backup of an interrupted first save alone;
    otherwise a damaged backup or `tune.json` raises.

    Raises:
        RunDirError: a damaged backup, one made with gradient accumulation where this run
            has none or the other way round, or a damaged `tune.json` with `--precision=tune`.
    """
    if dirs is None:
        return None
    owner = not dirs.temporary  # the chief, or a single process
    if owner:
        remove_leftovers(config.model_dir)
    if config.restart:
        if owner:
            for old, new in restart(config.model_dir):
                logging.warning("--restart: moved %s to %s", old, new)
        return None
    if config.precision == "tune":
        read_tuned(config.model_dir)
    return checked_backup(dirs.restore_dir, config.grad_accum_steps, owner=owner)


def _choose_policy(config: TrainConfig, source: ModelSource, data: Data, hardware: HardwareInfo, strategy: tf.distribute.Strategy,
                   ) -> tuple[PolicyChoice, Optional[dict[str, Any]]]:
    """`resolve_policy`, or with `precision="tune"` a measured choice (`tfmp.tune`: the policy
    and whether XLA compiles, XLA measured where it can train under `strategy`).

    The tuned choice is written to `model_dir/tune.json`; a rerun that finds it
    (a resumed run) keeps that choice instead of measuring again.
    """
    if config.precision != "tune":
        return resolve_policy(config.precision, hardware), None
    saved = os.path.join(config.model_dir, TUNED) if config.model_dir else None
    tuned = read_tuned(config.model_dir)
    if tuned is not None:
        return PolicyChoice(tuned["policy"], f"kept from {saved}: {tuned['reason']}", "tune"), tuned
    keras.utils.set_random_seed(config.seed)
    compiled: Compilation = compilation(source.build(data.model_kwargs()), config,
                                        source.reference)
    build = lambda: _built(source, data)  # noqa: E731
    if isinstance(compiled.loss, (dict, list, tuple)):
        raise ConfigError("--precision=tune measures one loss; this model has one per output "
                          "(a dict or list of losses): give a policy instead")
    result = tune(build, data.train, steps=config.tune_steps, seed=config.seed,
                  hardware=hardware, loss=compiled.loss, optimizer=compiled.optimizer,
                  strategy=strategy, xla=XLA_ONLY if config.jit_compile else True)
    tuned = result.to_dict()
    if saved:
        os.makedirs(config.model_dir, exist_ok=True)
        write_json_atomically(saved, tuned)
    return PolicyChoice(result.policy, result.reason, "tune"), tuned


def _built(source: ModelSource, data: Data) -> keras.Model:
    model = source.build(data.model_kwargs())
    forget_compilation(model)  # tune compiles each copy with the run's loss
    build_on(model, data)
    return model


def _tuned_xla(tuned: Optional[dict[str, Any]], strategy: tf.distribute.Strategy) -> bool:
    """Whether `--precision=tune` chose XLA, and XLA can train under `strategy` (a resumed run
    may use another strategy than the one tuned for: XLA is then dropped, with a warning)."""
    if not (tuned and tuned.get("jit_compile")):
        return False
    refusal = xla_refusal(strategy)
    if refusal:
        logging.warning("--precision=tune chose XLA, but XLA %s: training without it", refusal)
    return not refusal


def train(config: TrainConfig, source: Any, data: Data,
          strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """Trains a model and returns the run's summary (also `summary.json`).

    `source` is a `ModelSource` (or a reference-style builder, `as_source`).

    With `model_dir`: `BackupAndRestore` (a rerun of the same command resumes
    after the last completed epoch, optimizer and loss scale included),
    TensorBoard logs, the final `model.keras` and `summary.json`.

    Raises:
        RunDirError: `model_dir` holds a damaged backup or `tune.json` (see `restart`).
        TrainingStopped: `NanMonitor` stopped training (`nan_policy="stop"`).
        tfmp.NonFiniteError: `nan_policy="raise"` and a NaN event happened.
    """
    check_config(config, strategy)
    source = as_source(source)
    steps = config.steps_per_epoch or data.steps(config.batch_size)
    if steps is None:
        raise ConfigError(f"--steps_per_epoch: the size of {data.name}'s training data is not "
                          "known (an endless dataset, TFRecord files, a filter): give "
                          "--steps_per_epoch")
    cluster = read_tf_config() if in_multi_worker_mode(strategy) else None
    check_cluster_config(config.precision, cluster, config.weights_dtype)
    dirs = write_dirs(config.model_dir, BACKUP, strategy) if config.model_dir else None
    resume_from = check_run_dir(config, dirs)  # before anything is measured or trained
    hardware = detect_hardware(strategy)
    choice, tuned = _choose_policy(config, source, data, hardware, strategy)
    policy = set_policy(choice, hardware)  # logs the choice's own reason
    weights = weights_fit(config.weights_dtype or (tuned or {}).get("weights_dtype"), policy)
    jit_compile = config.jit_compile or _tuned_xla(tuned, strategy)
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model, optimizer = _build_compiled(config, source, data, policy, hardware,
                                           jit_compile, weights)
    throughput = _Throughput(config.batch_size)
    # Restore exactly what was checked (None: nothing to resume, or a lone first-save file
    # the chief moves aside, which a worker must not try to read meanwhile).
    callbacks, monitor, nan = job_callbacks(config, dirs, resume=resume_from is not None)
    callbacks.append(throughput)
    if config.model_dir:
        os.makedirs(config.model_dir, exist_ok=True)
    # Keras restores the weights, not the input iterator: a resumed run skips the
    # batches the restored epochs trained on (tfmp.data's order is seeded per pass).
    done = resume_from.epoch if resume_from else 0
    train_data = _training_data(data, done * steps, strategy)
    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar, or a line per epoch in a log
    # shuffle=False: tfmp.app.data shuffles (Keras' default True cannot shuffle a dataset,
    # and says so in a warning on every run).
    history = model.fit(train_data, epochs=config.epochs, steps_per_epoch=steps, shuffle=False,
                        callbacks=callbacks, verbose=verbose)
    stopped = nan.stopped_event is not None
    if data.eval is None and not stopped:
        logging.info("tfmp: %s has no evaluation data: not evaluated", data.name)
    evaluation = {} if stopped or data.eval is None else _evaluate(model, data, verbose)
    epochs_run = history.epoch
    scale_mode, scale_flags = used_scale_flags(optimizer, policy)
    summary = {
        "flags": {**dataclasses.asdict(config), **scale_flags},
        "model": source.name,
        "policy": policy, "policy_reason": choice.reason, "policy_source": choice.source,
        "weights_dtype": weights, "lost_updates": monitor.summary.get("lost_updates"),
        "jit_compile": jit_compile,
        "float32_layers": kept_float32(model),
        "hardware": hardware.describe().splitlines(),
        "strategy": type(strategy).__name__, "replicas": replicas,
        "cluster": None if cluster is None else {
            "workers": cluster.num_workers, "task": cluster.name, "replicas": replicas,
            "global_batch": config.batch_size},
        "dataset": data.name, "steps_per_epoch": steps,
        "resumed_from_epoch": epochs_run[0] if epochs_run and epochs_run[0] > 0 else None,
        "epochs_completed": epochs_run,
        "samples_per_sec": round(throughput.samples_per_sec(), 1),
        "final_train_metrics": {k: v[-1] for k, v in history.history.items() if v},
        "eval_metrics": evaluation,
        "loss_scale": {"mode": scale_mode, **{k: monitor.summary.get(k) for k in
                       ("loss_scale_start", "loss_scale_end", "loss_scale_min")}},
        "start_step": monitor.summary.get("start_step"),
        "overflow_steps_skipped": monitor.summary.get("overflow_steps_skipped"),
        "nan_losses": monitor.summary.get("nan_losses"),
        "nan_events": [dataclasses.asdict(e) for e in nan.events],
        "stopped_by_nan": stopped,
        "tune": tuned,
    }
    if dirs:  # every worker saves (TensorFlow's guide); only the chief's files stay
        _write_outputs(dirs, model, summary, stopped)
    if stopped:
        raise TrainingStopped(nan.stopped_event.message())
    return summary


class _WithoutCounters(keras.callbacks.Callback):
    """Keeps the loss-scale counters (the optimizer's state, not metrics of the evaluation)
    out of `evaluate`'s progress output."""

    def on_test_batch_end(self, batch, logs=None):
        for key in COUNTERS:
            (logs or {}).pop(key, None)

    def on_test_end(self, logs=None):
        self.on_test_batch_end(None, logs)


def _training_data(data: Data, skip: int, strategy: tf.distribute.Strategy) -> Any:
    """The training batches after the `skip` a resumed run already trained on: in a
    multi-worker run with a data function that shards, each worker's own
    (`distribute_datasets_from_function`)."""
    if data.per_worker is not None and in_multi_worker_mode(strategy):
        return strategy.distribute_datasets_from_function(
            lambda context: data.per_worker(context).skip(skip))
    return data.train.skip(skip) if skip else data.train


def _evaluate(model: keras.Model, data: Data, verbose: int) -> dict[str, Any]:
    """The metrics on the evaluation split, said first in a log line and shown with Keras'
    progress output (`verbose`: a bar, or one line at the end), the counters left out."""
    logging.info("tfmp: evaluating on %s's evaluation split", data.name)
    metrics = model.evaluate(data.eval, verbose=verbose, return_dict=True,
                             callbacks=[_WithoutCounters()])
    return {k: v for k, v in metrics.items() if k not in COUNTERS}


def _write_outputs(dirs: WriteDirs, model: keras.Model, summary: dict[str, Any],
                   stopped: bool) -> None:
    """`summary.json` and (unless stopped) `model.keras`, both written before either replaces
    what an earlier run left; then the backup, which has done its job, is removed. A write that
    fails leaves the earlier files and the backup as they were (the next run resumes)."""
    summary_path = os.path.join(dirs.model_dir, SUMMARY)

    def say(path: str) -> None:  # the chief's files, not another worker's temporary ones
        if not dirs.temporary:
            logging.info("tfmp: writing %s", path)

    if stopped:  # the backup is kept for a resume
        say(summary_path)
        write_json_atomically(summary_path, summary)
    else:
        model_path = os.path.join(dirs.model_dir, FINAL_MODEL)
        with atomic_path(summary_path, ".json") as new_summary, \
                atomic_path(model_path, ".keras") as new_model:
            say(model_path)
            try:
                model.save(new_model)
            except OSError as e:  # zipfile's errors name no file
                if e.filename:
                    raise
                raise OSError(e.errno, e.strerror or str(e), model_path) from e
            say(summary_path)
            write_json(new_summary, summary)
        shutil.rmtree(dirs.backup_dir, ignore_errors=True)
    if dirs.temporary:
        shutil.rmtree(dirs.model_dir, ignore_errors=True)
