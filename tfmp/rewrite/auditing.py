"""`tfmp.audit`: what runs in which precision, and what is wrong with it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import keras

from tfmp import _compat
from tfmp._messages import first_line
from tfmp.compensation.optimizer import compensated_part
from tfmp.precision import HardwareInfo, detect_hardware
from tfmp.precision.policy import global_policy_name
from tfmp.rewrite.audit_report import SEVERITIES, AuditReport, Finding, LayerSummary
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.classify import (UPCASTING_NORMALIZATION, expected_to_differ, is_normalization,
                                   is_plain_model, is_softmax, iter_layers, kept_float32,
                                   output_layers)
from tfmp.rewrite.tracing import (EXP_LOG_OPS, HEAVY_OPS, SOFTMAX_OPS, SUM_OPS, ModelRun,
                                  run_model)

LARGE_REDUCTION = 1024  # elements summed into one value: a 16-bit sum that large loses digits
FLOAT32_MATMUL_SHARE = 0.01  # float32 matmuls in a 16-bit layer worth a finding (of the model's FLOPs)


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _check_outputs(model: keras.Model, ctx: "_Context") -> None:
    if ctx.run is not None:
        for i, (dtype, path) in enumerate(zip(ctx.run.output_dtypes, ctx.run.output_producers)):
            if dtype in HALF_DTYPES:
                ctx.add("output-not-float32", "error", path, f"model output {i} is {dtype}",
                        "give the last layer dtype='float32' or run tfmp.enforce_float32(model)")
        return
    if not is_plain_model(model):
        ctx.add("outputs-unchecked", "info", "<model>",
                "outputs of a subclassed model cannot be checked without running it",
                "end the model with tfmp.layers.Float32Output")
        return
    for i, tensor in enumerate(keras.tree.flatten(model.outputs)):
        if _dtype(tensor) != "float32":
            layer = _compat.producer(tensor)
            ctx.add("output-not-float32", "error", layer.name,
                    f"model output {i} is {_dtype(tensor)}",
                    "give the last layer dtype='float32' or run tfmp.enforce_float32(model)")


def _check_layers(model: keras.Model, ctx: "_Context") -> None:
    outputs = {id(l) for l in output_layers(model)}
    if ctx.run is not None:  # the layers whose ops made the outputs (any model kind)
        outputs |= {id(layer.layer) for layer in ctx.run.layers
                    if layer.path in ctx.run.output_producers}
    mismatched: list[str] = []
    kept = kept_float32(model)
    for path, why in kept.items():
        ctx.add("kept-float32", "info", path, f"computes in float32 on purpose: {why}",
                "nothing to do (tfmp.prepare's float32_layers)")
    for path, layer in iter_layers(model):
        compute = layer.compute_dtype
        if ctx.run is not None:
            pass  # softmax and normalization: judged by the ops that ran (_check_ops)
        elif is_softmax(layer) and compute in HALF_DTYPES:
            ctx.add("softmax-half", "warning", path, f"softmax computes in {compute}",
                    "give it dtype='float32' or use tfmp.layers.StableSoftmax")
        elif (is_normalization(layer) and compute in HALF_DTYPES
                and not isinstance(layer, UPCASTING_NORMALIZATION)):
            ctx.add("normalization-half", "warning", path, f"normalization computes in {compute}",
                    "give it dtype='float32' or use tfmp.layers.StableLayerNorm")
        for var in _compat.own_variables(layer):
            if _dtype(var) not in HALF_DTYPES:
                continue
            if not var.trainable:  # updated by its layer (statistics), not by the optimizer
                ctx.add("variable-not-float32", "error", var.path,
                        f"non-trainable variable is {_dtype(var)}: its layer's small updates "
                        "are lost (no optimizer compensates them)",
                        "keep it float32: a mixed_* policy, or tfmp.prepare(..., weights_dtype="
                        f"'{_dtype(var)}'), which keeps non-trainable variables float32")
            elif ctx.compensated:
                ctx.compensated_variables.append(var.path)
            else:
                ctx.add("variable-not-float32", "error", var.path,
                        f"variable is {_dtype(var)}: updates smaller than its precision are lost",
                        "use a mixed_* policy (float32 variables), or keep it in 16 bits with a "
                        f"compensated optimizer: {compensation_fix(_dtype(var))}")
        if (layer.dtype_policy.name != ctx.policy and not expected_to_differ(layer, outputs)
                and path not in kept and not _weights_variant(layer, ctx)):
            mismatched.append(f"{path} ({layer.dtype_policy.name})")
        if ctx.align and id(layer) not in outputs:  # output sizes are set by the task
            _check_sizes(path, layer, ctx)
    if mismatched:
        shown = ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
        ctx.add("policy-mismatch", "warning", mismatched[0].split(" ")[0],
                f"{len(mismatched)} layer(s) use another policy than the global "
                f"{ctx.policy} (was the policy set after the model was built?): {shown}",
                "build the model after tfmp.set_policy(), or use tfmp.prepare()")


def _check_ops(model: keras.Model, ctx: "_Context") -> None:
    """Findings from the ops each layer ran, whatever its class or name."""
    for layer in ctx.run.layers if ctx.run is not None else ():
        half = [op for op in layer.ops if op.dtype in HALF_DTYPES]
        types = {op.type for op in half}
        dtype = half[0].dtype if half else ""
        if types & set(SOFTMAX_OPS):
            ctx.add("softmax-half", "warning", layer.path, f"softmax computes in {dtype}",
                    "give the layer dtype='float32' or use tfmp.layers.StableSoftmax")
        elif types & set(EXP_LOG_OPS):
            ctx.add("exp-log-half", "warning", layer.path,
                    f"{'/'.join(sorted(types & set(EXP_LOG_OPS)))} computes in {dtype}: it "
                    "overflows or loses most digits there",
                    "compute it in float32 (ops.cast the input) or give the layer dtype='float32'")
        # Statistics: a mean or sum and a square root of it, the root in 16 bits. (Keras'
        # ops.mean sums 16-bit inputs in float32 but returns 16 bits: the squares before it
        # and the root after it are still 16-bit; in float16 a square above 256 is inf.)
        statistics = layer.half_statistics()
        if statistics:
            ctx.add("normalization-half", "warning", layer.path,
                    f"normalization statistics ({', '.join(statistics)}) "
                    f"compute in {dtype}",
                    "compute them in float32 inside call, give the layer dtype='float32', or use "
                    "tfmp.layers.StableLayerNorm")
        else:
            large = max((op.reduced for op in half if op.type in SUM_OPS), default=0)
            if large >= LARGE_REDUCTION:
                ctx.add("large-reduction-half", "warning", layer.path,
                        f"a sum of {large} elements computes in {dtype}: it loses digits",
                        "sum in float32 (ops.cast the input first)")
        heavy32 = sum(op.flops for op in layer.ops if op.type in HEAVY_OPS and op.dtype == "float32")
        total = ctx.run.flops()
        if (layer.layer.compute_dtype in HALF_DTYPES and total
                and heavy32 >= FLOAT32_MATMUL_SHARE * total):
            ctx.add("heavy-op-float32", "info", layer.path,
                    f"policy {layer.policy}, but {100 * heavy32 / total:.0f}% of the model's "
                    "matmul/convolution FLOPs run in float32 in its code: no 16-bit speed there",
                    "if not on purpose (logits, positions), let its code compute in "
                    "self.compute_dtype; else nothing to do")


def _check_sizes(path: str, layer: keras.layers.Layer, ctx: "_Context") -> None:
    for attr in ("units", "filters", "output_dim"):
        size = getattr(layer, attr, None)
        if isinstance(size, int) and size % ctx.align:
            ctx.add("size-not-aligned", "info", path,
                    f"{attr}={size} is not a multiple of {ctx.align} ({ctx.hardware.accelerator})",
                    f"round {attr} to a multiple of {ctx.align} for full-speed matmuls")


def compensation_fix(dtype: str) -> str:
    """How to keep `dtype` weights with their small updates (float16: a Kahan buffer)."""
    if dtype == "float16":
        return ("tfmp.prepare(..., weights_dtype='float16') or "
                "tfmp.compensate(optimizer, rounding='kahan')")
    return f"tfmp.prepare(..., weights_dtype='{dtype}') or tfmp.compensate(optimizer)"


def _weights_variant(layer: keras.layers.Layer, ctx: "_Context") -> bool:
    """A layer storing its weights in its compute dtype under a compensated optimizer
    (`bfloat16` under `mixed_bfloat16`): what `weights_dtype=` asks for, no mismatch."""
    return ctx.compensated and layer.dtype_policy.name == keras.dtype_policies.get(
        ctx.policy).compute_dtype


def _compensating(optimizer: Any) -> Optional[str]:
    """The rounding of a compensated optimizer that keeps small updates, else None."""
    inner = compensated_part(optimizer)
    return inner.rounding if inner is not None and inner.rounding != "nearest" else None


def _check_optimizer(model: keras.Model, optimizer: Any, ctx: "_Context") -> None:
    uses_fp16 = "float16" in ctx.compute_dtypes
    uses_half = bool(ctx.compute_dtypes & set(HALF_DTYPES))
    scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if optimizer is None:
        if uses_fp16:
            ctx.add("unchecked-loss-scaling", "info", "<optimizer>",
                    "no optimizer given: loss scaling not checked",
                    "pass the optimizer to tfmp.audit")
        return
    if uses_fp16 and not scaling:
        ctx.add("fp16-without-loss-scaling", "error", "<optimizer>",
                "float16 layers but the optimizer does no loss scaling: small gradients underflow to 0",
                "tfmp.wrap_optimizer(optimizer, 'mixed_float16')")
    dynamic = scaling and getattr(optimizer, "dynamic", True)
    if dynamic and not uses_fp16:
        ctx.add("loss-scaling-without-fp16", "warning", "<optimizer>",
                "dynamic loss scaling but no float16 layer "
                f"({'bfloat16' if uses_half else 'float32'}): wasted work",
                "drop the LossScaleOptimizer (or tfmp.wrap_optimizer(..., guard=True) for a NaN guard)")
    if ctx.compensated:  # 16-bit weights and slots, written without losing small updates
        if ctx.compensated_variables:
            ctx.add("variables-compensated", "info", ctx.compensated_variables[0],
                    f"{len(ctx.compensated_variables)} variable(s) in 16 bits; the optimizer "
                    f"keeps their small updates (rounding={ctx.compensated!r})",
                    "nothing to do")
        return
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    half = [v for v in model.trainable_variables if _dtype(v) in HALF_DTYPES]
    if not getattr(inner, "built", True) and half:
        # Not built yet: its slots will copy the dtype of the variables they mirror.
        ctx.add("optimizer-slot-not-float32", "error", "<optimizer>",
                f"the optimizer will create its slots in {_dtype(half[0])} like the "
                f"{len(half)} 16-bit variable(s) they mirror (first: {half[0].path}): it will run "
                "in 16 bits",
                "build model and optimizer under a mixed_* policy (float32 variables)")
    for var in getattr(optimizer, "variables", []):
        if _dtype(var) in HALF_DTYPES:
            ctx.add("optimizer-slot-not-float32", "error", var.path,
                    f"optimizer variable is {_dtype(var)}: the optimizer runs in 16 bits",
                    "build model and optimizer under a mixed_* policy (float32 variables)")


@dataclasses.dataclass
class _Context:
    policy: str
    hardware: HardwareInfo
    align: int
    compute_dtypes: set[str]  # of every layer, nested ones included, and of the ops that ran
    run: Optional[ModelRun] = None
    findings: list[Finding] = dataclasses.field(default_factory=list)
    compensated: Optional[str] = None  # the optimizer's rounding, if it keeps small updates
    compensated_variables: list[str] = dataclasses.field(default_factory=list)

    def add(self, *args: str) -> None:
        self.findings.append(Finding(*args))


CHECKS: tuple[Callable[[keras.Model, _Context], None], ...] = (_check_outputs, _check_layers,
                                                               _check_ops)


def _run(model: keras.Model, data: Any, ctx: "_Context") -> Optional[ModelRun]:
    try:
        return run_model(model, data)
    except Exception as e:  # noqa: BLE001 (a model's own code raises anything when traced)
        first = first_line(e)
        ctx.add("not-run", "info", "<model>",
                f"the model could not be run to see what it computes ({type(e).__name__}: "
                f"{first}); outputs, softmax and normalization judged by the layers' configs",
                "pass data= (a batch of inputs), or build the model on a batch first")
        return None


def _summaries(run: Optional[ModelRun]) -> tuple[LayerSummary, ...]:
    if run is None:
        return ()
    return tuple(LayerSummary(layer.path, layer.class_name, layer.policy, layer.output_dtypes,
                              layer.flops(), layer.flops(HALF_DTYPES)) for layer in run.layers)


def audit(
    model: keras.Model,
    optimizer: Optional[keras.optimizers.Optimizer] = None,
    hardware: Optional[HardwareInfo] = None,
    *,
    policy: Optional[str] = None,
    data: Any = None,
    run: Optional[ModelRun] = None,
) -> AuditReport:
    """Checks what runs in which precision and reports what is wrong.

    The model is run (traced, `tfmp.rewrite.run_model`: nothing executes, no weight
    changes) on a batch of its input shapes or on `data`, and judged by what it ran:
    the dtype of every output, the share of matmul and convolution FLOPs in 16 bits,
    softmax, exp/log, large sums and normalization statistics computed in 16 bits
    (found by the ops each layer runs, not by its class or name), and 16-bit layers
    whose code runs its matmuls in float32. Configs are read for what only they say
    (variable dtypes, policies, layer sizes).

    Args:
        model: A Keras model of any kind (subclassed and keras-hub models included).
        optimizer: The optimizer to check; defaults to `model.optimizer` if compiled.
            A compensated one (`tfmp.compensate`, rounding other than `"nearest"`) turns
            16-bit variables and slots from errors into one info finding.
        hardware: The hardware to judge for; detected when omitted.
        policy: The policy the model is meant to run under (layers under another one
            are reported); default Keras' global policy. `tfmp.rewrite.classify.model_policy(model)`
            audits a saved model against the policy it was built with.
        data: A batch to run the model on (an array, a structure of arrays, `(x, y)` or
            a `tf.data.Dataset`); default: the model's input shapes. A model that cannot
            be run is judged by its configs (an info finding says so).
        run: The model's trace, `tfmp.rewrite.run_model(model, data)`, if you have it
            (of the model as it is now): judged instead of tracing the model again.

    Returns:
        An `AuditReport`: `report.ok`, `report.errors`, `str(report)` (findings),
        `report.layer_table()` (every layer as it ran), `report.half_flops_share`,
        `report.to_dict()` (JSON).

    Example:
    >>> report = tfmp.audit(model, optimizer)
    >>> print(report)
    >>> print(report.layer_table())
    >>> assert report.ok, report.errors
    """
    hw = hardware if hardware is not None else detect_hardware()
    policy = policy or global_policy_name()
    align = {"tpu": 128, "gpu": 8}.get(hw.accelerator, 0)
    ctx = _Context(policy, hw, align, {l.compute_dtype for _, l in iter_layers(model)})
    ctx.run = run if run is not None else _run(model, data, ctx)
    if ctx.run is not None:
        ctx.compute_dtypes |= {op.dtype for layer in ctx.run.layers for op in layer.ops}
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    ctx.compensated = _compensating(optimizer)
    for check in CHECKS:
        check(model, ctx)
    _check_optimizer(model, optimizer, ctx)
    if hw.accelerator == "tpu" and "float16" in ctx.compute_dtypes:
        ctx.add("fp16-on-tpu", "error", "<model>",
                "float16 layers on TPU: TPUs pair bfloat16 with float32, not float16",
                "use mixed_bfloat16 (tfmp.set_policy('bf16'))")
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings = sorted(ctx.findings, key=lambda f: order[f.severity])
    run = ctx.run
    return AuditReport(tuple(findings), policy, _summaries(run),
                       run.input_shapes if run else (), run.flops() if run else 0,
                       run.share(HALF_DTYPES) if run else None)
