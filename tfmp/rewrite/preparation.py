"""`tfmp.prepare`: the one call that makes a model and optimizer mixed-precision ready."""

from __future__ import annotations

from typing import Any, Optional, Union

import keras
from absl import logging

from tfmp.distribute import enable_multi_worker_fit
from tfmp.precision import HardwareInfo, detect_hardware, resolve_policy, set_policy
from tfmp.rewrite.auditing import AuditReport, audit
from tfmp.rewrite.classify import is_plain_model, model_policy
from tfmp.rewrite.cloning import rebuild_under_policy
from tfmp.rewrite.enforcement import enforce_float32, float32_selector
from tfmp.rewrite.islands import apply_islands
from tfmp.scaling import LossScale, guard_model_state, wrap_optimizer


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


def convert_policy(model: keras.Model, policy: str) -> keras.Model:
    """`model` rebuilt to compute under another dtype policy, weights copied bit for bit.

    Outputs, normalization and softmax layers (and tfmp's float32 layers) stay in
    float32; every other layer built under the model's policy takes `policy`;
    layers given another dtype on purpose keep it. Variables are float32 under
    every policy, so round trips (float32 -> mixed_bfloat16 -> mixed_float16 ->
    float32) leave the weights bit-identical. The input model is not changed, and
    Keras' global policy is not touched. `tfmp.prepare` converts through this.

    Args:
        model: A built Sequential or Functional model.
        policy: `float32`, `mixed_float16` or `mixed_bfloat16` (any spelling
            `tfmp.parse_precision` accepts; `auto` resolves from the hardware).

    Returns:
        A new model (also when the policy is already the model's: then only its
        float32 layers are enforced).

    Raises:
        ValueError: a bad policy name, or a subclassed or unbuilt model.

    Example:
    >>> f32 = tfmp.convert_policy(keras.models.load_model("mixed.keras"), "float32")
    """
    target = resolve_policy(policy).name
    if not is_plain_model(model):
        raise ValueError(f"convert_policy needs a Sequential or Functional model; "
                         f"{type(model).__name__!r} is subclassed (build it under the policy instead)")
    source = model_policy(model)
    if source == target:
        return enforce_float32(model)
    logging.info("tfmp: rebuilding the %s model under %s", source, target)
    return rebuild_under_policy(model, source, target, float32_selector(model))


def prepare(
    model: keras.Model,
    optimizer: Union[str, keras.optimizers.Optimizer],
    precision: str = "auto",
    *,
    loss_scale: LossScale = "dynamic",
    guard: bool = False,
    float32_islands: bool = True,
    hardware: Optional[HardwareInfo] = None,
    **scale_args: Any,
) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """Sets the policy, fixes the model, wraps the optimizer and audits the result.

    1. `tfmp.set_policy(precision)`.
    2. If `model` was built under another policy (a pretrained float32 model
       going mixed, or a mixed model going float32 or to the other 16-bit
       type), it is rebuilt under the new policy with its weights copied;
       otherwise outputs, softmax and normalization layers are put in
       float32 (`tfmp.enforce_float32`). Never half converted.
       Activations known to be slower in 16 bits on this hardware (GELU on a
       CPU under bfloat16: `tfmp.rewrite.ISLANDS`) are computed in float32
       and cast back.
    3. `tfmp.wrap_optimizer(optimizer, policy, loss_scale=..., guard=..., **scale_args)`.
    4. `tfmp.audit`: raises on errors.
    5. `tfmp.guard_model_state(model)`.
    6. Under a MultiWorkerMirroredStrategy with several workers,
       `tfmp.distribute.enable_multi_worker_fit(model)`: Keras 3.15's `fit`
       fails there otherwise (keras-team/keras#20585).

    Args:
        model: A built Sequential or Functional model. A subclassed model is
            only audited (build it with `tfmp.layers`).
        optimizer: A Keras optimizer or its name.
        precision: Any name `tfmp.set_policy` accepts (default `auto`).
        loss_scale, guard, **scale_args: See `tfmp.wrap_optimizer`.
        float32_islands: Apply `tfmp.rewrite.ISLANDS` (Sequential and Functional
            models; default True).
        hardware: The hardware to decide and audit for; detected when omitted.

    Returns:
        `(model, optimizer)`: compile and fit these. The model's train step is
        guarded (`tfmp.guard_model_state`: a skipped step changes no state). A
        Sequential or Functional input model is left unchanged (a copy is
        returned); a subclassed one is returned itself, with that guard.

    Raises:
        AuditError: the prepared model still has audit errors (a `ValueError`).
        ValueError: a bad precision name or optimizer argument.

    Example:
    >>> model, opt = tfmp.prepare(model, keras.optimizers.Adam(1e-3), "auto")
    >>> model.compile(opt, "sparse_categorical_crossentropy")
    """
    hw = hardware if hardware is not None else detect_hardware()
    policy = set_policy(precision, hw)
    if is_plain_model(model):
        model = convert_policy(model, policy)
        if float32_islands:  # `model` is the copy made above: ours to change
            for change in apply_islands(model, policy, hw):
                logging.info("tfmp.prepare: float32 island %s", change)
    opt = wrap_optimizer(optimizer, policy, loss_scale=loss_scale, guard=guard, **scale_args)
    report = audit(model, opt, hw)
    if not report.ok:
        raise AuditError(report)
    for finding in report.warnings:
        logging.warning("tfmp.prepare: %s: %s (%s)", finding.path, finding.problem, finding.fix)
    model = guard_model_state(model)
    for fix in enable_multi_worker_fit(model):
        logging.info("tfmp.prepare: multi-worker fit fix %s applied", fix)
    return model, opt
