"""`tfmp.prepare`: the one call that makes a model and optimizer mixed-precision ready."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import keras
from absl import logging

from tfmp.distribute import enable_multi_worker_fit
from tfmp.precision import HardwareInfo, detect_hardware, set_policy
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.audit_report import AuditReport
from tfmp.rewrite.auditing import audit
from tfmp.rewrite.classify import KEPT_FLOAT32, iter_layers, kept_float32
from tfmp.rewrite.conversion import convert_with_trace
from tfmp.rewrite.enforcement import LayerSpec, layer_matcher
from tfmp.rewrite.inplace import policies_of, restore_policies
from tfmp.rewrite.islands import apply_islands
from tfmp.rewrite.overflow_report import MODEL_OWN, OverflowReport
from tfmp.rewrite.overflows import locate_overflows
from tfmp.rewrite.storage import restore_storage, store_weights
from tfmp.scaling import build_optimizer, guard_model_state, wrap_optimizer
from tfmp.scaling.wrapping import LossScale, check_keywords
from tfmp.scaling.half_weights import checked_weights_dtype


class AuditError(ValueError):
    """`tfmp.prepare` found errors; `.report` holds the full `AuditReport`.

    Args:
        report: The audit with at least one error.
    """

    def __init__(self, report: AuditReport) -> None:
        self.report = report
        super().__init__(
            "tfmp.prepare: the model is not mixed-precision safe:\n" + str(report)
        )


def _float32_layers(model: keras.Model, spec: Any, policy: str,
                    calibration_data: Any) -> dict[Any, str]:
    """The layers `float32_layers` keeps in float32, each with why."""
    if isinstance(spec, str) and spec == "auto":
        if keras.dtype_policies.get(policy).compute_dtype not in HALF_DTYPES:
            return {}
        if calibration_data is None:
            raise ValueError("float32_layers='auto' needs calibration_data= (a few batches of "
                             "the training data) to find the layers that overflow")
        spec = locate_overflows(model, calibration_data, policy=policy)
        logging.info("tfmp.prepare: %s", spec)
    if isinstance(spec, OverflowReport):
        if any(row.path == MODEL_OWN for row in spec.layers):
            logging.warning("tfmp.prepare: the model's own call overflows under %s: no layer "
                            "policy reaches it; cast to float32 in its code", policy)
        return {row.path: row.reason for row in spec.layers if row.path != MODEL_OWN}
    if isinstance(spec, str) or not isinstance(spec, (list, tuple, set, frozenset)):
        raise ValueError(f"float32_layers={spec!r}: give 'auto', a list of layer names, paths "
                         "or classes, or an OverflowReport")
    return {item: "given in float32_layers" for item in spec}


def _record_kept(model: keras.Model, kept: dict[Any, str]) -> None:
    """Notes on `model` which layers `float32_layers` kept in float32 and why, by path
    (`tfmp.rewrite.kept_float32`: the audit lists them and does not flag their policy)."""
    found = {}
    for spec, why in kept.items():
        matches = layer_matcher(model, [spec])
        found.update({path: why for path, layer in iter_layers(model) if matches(layer)})
    if found:
        setattr(model, KEPT_FLOAT32, found)
    else:
        vars(model).pop(KEPT_FLOAT32, None)


def _optimizer_classes(optimizer: Any) -> list[tuple[Any, type]]:
    """The optimizer given and its inner one, each with its class (`tfmp.compensate` changes
    it in place)."""
    targets = [optimizer, getattr(optimizer, "inner_optimizer", None)]
    return [(t, type(t)) for t in targets if isinstance(t, keras.optimizers.Optimizer)]


def _audited(model: keras.Model, optimizer: keras.optimizers.Optimizer, hw: HardwareInfo,
             data: Any, run: Any) -> AuditReport:
    """The audit of the prepared model (judging `run`, the conversion's trace, when it is still
    the model's: one trace, not two), and the optimizer built on it.

    Raises:
        AuditError: the audit found errors.
    """
    report = audit(model, optimizer, hw, data=data, run=run)
    if not report.ok:
        raise AuditError(report)
    build_optimizer(model, optimizer)  # now, not in the first traced step: one trace, not two
    return report


def prepare(
    model: keras.Model,
    optimizer: Union[str, keras.optimizers.Optimizer],
    precision: str = "auto",
    *,
    loss_scale: LossScale = "dynamic",
    guard: bool = False,
    float32_islands: bool = True,
    hardware: Optional[HardwareInfo] = None,
    data: Any = None,
    float32_layers: Union[str, OverflowReport, Iterable[LayerSpec]] = (),
    calibration_data: Any = None,
    weights_dtype: Optional[str] = None,
    **scale_args: Any,
) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """Sets the policy, fixes the model, wraps the optimizer and audits the result.

    1. `tfmp.set_policy(precision)`.
    2. `tfmp.convert_policy(model, policy)`: a model built under another
       policy (a pretrained float32 model going mixed, or a mixed model going
       float32 or to the other 16-bit type) computes under the new one, its
       outputs and softmax layers in float32 (normalization layers as
       `convert_policy` says), weights
       untouched. Never half converted. Sequential and Functional models of
       Keras' own classes are copied; every other kind is converted in place.
       Activations known to be slower in 16 bits on this hardware (GELU on a
       CPU under bfloat16: `tfmp.rewrite.ISLANDS`) are computed in float32
       and cast back.
    3. With `weights_dtype`, the weights stored in 16 bits (`tfmp.rewrite.storage`).
       `tfmp.wrap_optimizer(optimizer, policy, loss_scale=..., guard=...,
       weights_dtype=..., **scale_args)`.
    4. `tfmp.audit`: raises on errors. It judges the trace step 2 made to place the
       normalization statistics when that trace is of the model returned (not converted
       again, no island applied since): the model is traced once, not twice.
    5. `tfmp.guard_model_state(model)`, and the optimizer built on the model's trainable
       variables (`tfmp.scaling.build_optimizer`: Keras then traces the first step once).
    6. Under a MultiWorkerMirroredStrategy with several workers,
       `tfmp.distribute.enable_multi_worker_fit(model)`: Keras 3.15's `fit`
       fails there otherwise (keras-team/keras#20585).

    Args:
        model: A built Keras model of any kind (see `tfmp.convert_policy` for which
            are copied and which are converted in place).
        optimizer: A Keras optimizer or its name.
        precision: Any name `tfmp.set_policy` accepts (default `auto`).
        loss_scale, guard, **scale_args: See `tfmp.wrap_optimizer`.
        float32_islands: Apply `tfmp.rewrite.ISLANDS` (default True).
        hardware: The hardware to decide and audit for; detected when omitted.
        data: A batch to run the model on, to convert it and to audit it (see
            `tfmp.convert_policy`); default: its input shapes.
        float32_layers: Layers to keep in float32 besides outputs, softmax and
            normalization statistics: names, paths (`block/dense`) or classes; an
            `OverflowReport` (`tfmp.locate_overflows`); or `"auto"`: under a 16-bit
            policy, `tfmp.locate_overflows(model, calibration_data, policy=...)` finds
            them. The audit lists each with why (an `info` finding, `kept-float32`;
            `tfmp.rewrite.kept_float32(model)`).
        calibration_data: The batches `"auto"` runs (a dataset, or `x`/`(x, y)`
            arrays; 8 batches of it are run); required with `"auto"`.
        weights_dtype: None (default: float32 variables), or the policy's 16-bit compute
            dtype (`"bfloat16"` under mixed_bfloat16, `"float16"` under mixed_float16):
            the trainable weights of the layers that compute in it are stored in it (those
            layers take the 16-bit policy, `"bfloat16"`), half the weight memory; outputs,
            softmax, normalization, `float32_layers` and non-trainable variables stay
            float32; the optimizer is compensated (`tfmp.compensate`, its inner one under
            loss scaling) so small updates are not lost. A float32 model is converted, a
            model built under the 16-bit policy is taken as it is.

    Returns:
        `(model, optimizer)`: compile and fit these. The model's train step is
        guarded (`tfmp.guard_model_state`: a skipped step changes no state). A
        Sequential or Functional input model is left unchanged (a copy is
        returned) unless one of its layers cannot be re-created from its config;
        any other kind is returned itself, converted in place.

    Raises:
        AuditError: the prepared model still has audit errors (a `ValueError`).
        ValueError: a bad precision name or optimizer argument; a keyword argument that
            is neither prepare's nor a loss-scale argument (under every precision, before
            anything is done: `tfmp.scaling.wrapping.check_keywords`); an unbuilt model; a
            model whose own code keeps every matmul in float32 under a 16-bit policy;
            a `float32_layers` entry naming no layer; `"auto"` without `calibration_data`;
            a `weights_dtype` that is not the policy's 16-bit compute dtype.
        On any error, Keras' global policy, the model given (its variables too) and the
        optimizer's class are as they were.

    Example:
    >>> model, opt = tfmp.prepare(model, keras.optimizers.Adam(1e-3), "auto")
    >>> model.compile(opt, "sparse_categorical_crossentropy")
    """
    check_keywords(prepare, scale_args)
    hw = hardware if hardware is not None else detect_hardware()
    previous, before = keras.config.dtype_policy(), policies_of(model)
    kept_before = kept_float32(model)
    policy = set_policy(precision, hw)
    stored, classes = [], _optimizer_classes(optimizer)
    try:
        weights = checked_weights_dtype(weights_dtype, policy)
        kept = _float32_layers(model, float32_layers, policy, calibration_data)
        converted, run = convert_with_trace(model, policy, data=data, float32_layers=list(kept))
        if float32_islands:  # the copy made above, or the model converted in place
            for change in apply_islands(converted, policy, hw):
                run = None  # traced before the change: the audit traces it again
                logging.info("tfmp.prepare: float32 island %s", change)
        if weights:
            stored = store_weights(converted, weights)
            run = None  # its layers' policies changed: the audit traces it again
        opt = wrap_optimizer(optimizer, policy, loss_scale=loss_scale, guard=guard,
                             weights_dtype=weights, **scale_args)
        _record_kept(converted, kept)
        report = _audited(converted, opt, hw, data, run)
    except BaseException:  # nothing changed: Keras' policy and a model converted in place
        keras.config.set_dtype_policy(previous)
        restore_storage(stored)
        restore_policies(model, before)
        _record_kept(model, kept_before)
        for target, cls in classes:  # compensated by wrap_optimizer: its own class again
            target.__class__ = cls
        raise
    model = converted
    for finding in report.warnings:
        logging.warning("tfmp.prepare: %s: %s (%s)", finding.path, finding.problem, finding.fix)
    model = guard_model_state(model)
    for fix in enable_multi_worker_fit(model):
        logging.info("tfmp.prepare: multi-worker fit fix %s applied", fix)
    return model, opt
