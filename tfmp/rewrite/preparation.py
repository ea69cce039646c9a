"""`tfmp.prepare`: the one call that makes a model and optimizer mixed-precision ready."""

from __future__ import annotations

from typing import Any, Optional, Union

import keras
from absl import logging

from tfmp.distribute import enable_multi_worker_fit
from tfmp.precision import HardwareInfo, detect_hardware, resolve_policy, set_policy
from tfmp.rewrite.auditing import AuditReport, audit
from tfmp.rewrite.classify import HALF_DTYPES, is_normalization, iter_layers, model_policy
from tfmp.rewrite.cloning import policy_rule
from tfmp.rewrite.enforcement import convert, float32_selector, normalizations_feeding
from tfmp.rewrite.inplace import model_level_layers, policies_of, restore_policies
from tfmp.rewrite.islands import apply_islands
from tfmp.rewrite.tracing import ModelRun, run_model
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


def _check_computes_in(model: keras.Model, run: Optional[ModelRun], policy: str) -> None:
    """Raises when a model converted to a 16-bit policy ran every matmul and convolution in
    float32 anyway (its own code casts to float32)."""
    half = keras.dtype_policies.get(policy).compute_dtype
    if run is None or half not in HALF_DTYPES or not run.flops() or run.flops((half,)):
        return
    stuck = [layer.path for layer in run.layers if layer.flops() and layer.policy == policy]
    if stuck:
        raise ValueError(
            f"{model.name!r} ({type(model).__name__}) under {policy} still computes every matmul "
            f"and convolution in float32: {', '.join(stuck[:5])}{' ...' if len(stuck) > 5 else ''} "
            f"run theirs in float32 although their policy is {policy} (does their code cast to "
            "float32?); give those layers 16-bit computations or keep the model in float32")


def _normalizations_with_half_statistics(model: keras.Model, run: Optional[ModelRun], policy: str,
                                        data: Any) -> set[str]:
    """Paths of the normalization layers that, under a 16-bit `policy`, take the square root
    of a sum in 16 bits (as the audit sees it: by what they run, not by their class)."""
    # Only the layers a conversion can change (not the sublayers a custom layer calls itself).
    changeable = model_level_layers(model)
    candidates = {path for path, layer in iter_layers(model) if id(layer) in changeable
                  and is_normalization(layer) and layer.compute_dtype in HALF_DTYPES}
    if not candidates or keras.dtype_policies.get(policy).compute_dtype not in HALF_DTYPES:
        return set()
    run = run if run is not None else run_model(model, data)
    return {layer.path for layer in run.layers
            if layer.path in candidates and layer.half_statistics()}


def convert_policy(model: keras.Model, policy: str, *, data: Any = None) -> keras.Model:
    """`model` made to compute under another dtype policy, weights kept bit for bit.

    Outputs and softmax layers (and tfmp's float32 layers) stay in float32; every
    other layer built under the model's policy takes `policy`; layers given
    another dtype on purpose keep it. Normalization layers take `policy` (their
    outputs are 16-bit tensors, half the activation memory) when their own code
    computes the statistics in float32, as Keras' BatchNormalization,
    LayerNormalization, GroupNormalization and RMSNormalization do: decided by
    tracing what they run under `policy`; a normalization layer that would take
    the root of a sum in 16 bits, or (in a Sequential or Functional graph, not
    across a nested model's inputs) whose output goes straight into a float32
    output layer or softmax, computes in float32. Variables are float32 under
    every policy, so round trips (float32 -> mixed_bfloat16 -> mixed_float16 ->
    float32) leave the weights bit-identical. Keras' global policy is not touched.
    `tfmp.prepare` converts through this.

    Copied or converted in place: a Sequential or Functional model of Keras' own
    classes (nested ones too) is rebuilt as a new model and the input model is
    not changed. Every other model (a subclassed model, a Functional subclass
    such as a keras-hub task, a model holding a layer whose config does not
    re-create it) is converted in place and returned itself: each layer takes
    its new dtype policy, the layers that produce its outputs compute in float32
    (found by running it), and an output its own `call` makes in 16 bits is cast
    to float32. Such a model is checked by running it: one that still computes
    every matmul in float32 under a 16-bit policy raises.

    Args:
        model: A built Keras model of any kind.
        policy: `float32`, `mixed_float16` or `mixed_bfloat16` (any spelling
            `tfmp.parse_precision` accepts; `auto` resolves from the hardware).
        data: A batch to run a model converted in place on (`tfmp.rewrite.example_inputs`:
            an array, a structure, `(x, y)` or a dataset); needed for a subclassed model
            that takes integer ids or inputs other than those it was built from;
            default: its input shapes.

    Returns:
        A new model, or `model` itself converted in place (see above).

    Raises:
        ValueError: a bad policy name; an unbuilt model; a model converted in place
            whose code keeps every matmul in float32 under a 16-bit policy.

    Example:
    >>> f32 = tfmp.convert_policy(keras.models.load_model("mixed.keras"), "float32")
    """
    target = resolve_policy(policy).name
    source = model_policy(model)
    if source != target:
        logging.info("tfmp: converting the %s model under %s", source, target)
    before = policies_of(model)
    rule = policy_rule(source, target, lambda layer: False)
    # Normalization layers take the policy too unless their output feeds a float32 layer;
    # those whose own code then computes the statistics in 16 bits go float32 (below).
    chosen = float32_selector(model, normalization=False)
    feeding = normalizations_feeding(model, chosen)

    def first(layer: keras.layers.Layer) -> bool:
        return chosen(layer) or id(layer) in feeding

    converted, run = convert(model, rule, first, data=data)
    try:
        half_statistics = _normalizations_with_half_statistics(converted, run, target, data)
        if half_statistics:
            logging.info("tfmp: normalization statistics computed in 16 bits by %s: float32 "
                         "for those layers", ", ".join(sorted(half_statistics)))
            if converted is model:
                restore_policies(model, before)
            paths = {id(layer): path for path, layer in iter_layers(model)}
            converted, run = convert(
                model, rule, lambda layer: first(layer) or paths.get(id(layer)) in half_statistics,
                data=data)
        _check_computes_in(converted, run, target)
    except BaseException:
        if converted is model:  # converted in place: give the model back as it came
            restore_policies(model, before)
        raise
    return converted


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
    3. `tfmp.wrap_optimizer(optimizer, policy, loss_scale=..., guard=..., **scale_args)`.
    4. `tfmp.audit`: raises on errors.
    5. `tfmp.guard_model_state(model)`.
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

    Returns:
        `(model, optimizer)`: compile and fit these. The model's train step is
        guarded (`tfmp.guard_model_state`: a skipped step changes no state). A
        Sequential or Functional input model is left unchanged (a copy is
        returned) unless one of its layers cannot be re-created from its config;
        any other kind is returned itself, converted in place.

    Raises:
        AuditError: the prepared model still has audit errors (a `ValueError`).
        ValueError: a bad precision name or optimizer argument; an unbuilt model; a
            model whose own code keeps every matmul in float32 under a 16-bit policy.
        On any error, Keras' global policy and the model given are as they were.

    Example:
    >>> model, opt = tfmp.prepare(model, keras.optimizers.Adam(1e-3), "auto")
    >>> model.compile(opt, "sparse_categorical_crossentropy")
    """
    hw = hardware if hardware is not None else detect_hardware()
    previous, before = keras.config.dtype_policy(), policies_of(model)
    policy = set_policy(precision, hw)
    try:
        converted = convert_policy(model, policy, data=data)
        if float32_islands:  # the copy made above, or the model converted in place
            for change in apply_islands(converted, policy, hw):
                logging.info("tfmp.prepare: float32 island %s", change)
        opt = wrap_optimizer(optimizer, policy, loss_scale=loss_scale, guard=guard, **scale_args)
        report = audit(converted, opt, hw, data=data)
        if not report.ok:
            raise AuditError(report)
    except BaseException:  # nothing changed: Keras' policy and a model converted in place
        keras.config.set_dtype_policy(previous)
        restore_policies(model, before)
        raise
    model = converted
    for finding in report.warnings:
        logging.warning("tfmp.prepare: %s: %s (%s)", finding.path, finding.problem, finding.fix)
    model = guard_model_state(model)
    for fix in enable_multi_worker_fit(model):
        logging.info("tfmp.prepare: multi-worker fit fix %s applied", fix)
    return model, opt
