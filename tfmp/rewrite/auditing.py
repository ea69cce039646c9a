"""`tfmp.audit`: what runs in which precision, and what is wrong with it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import keras

from tfmp import _compat
from tfmp.precision import HardwareInfo, detect_hardware, global_policy_name
from tfmp.rewrite.classify import (
    HALF_DTYPES,
    UPCASTING_NORMALIZATION,
    expected_to_differ,
    is_normalization,
    is_plain_model,
    is_softmax,
    iter_layers,
    output_layers,
)

SEVERITIES = ("error", "warning", "info")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One audit finding.

    Attributes:
        code: Stable identifier (e.g. `"output-not-float32"`).
        severity: `"error"`, `"warning"` or `"info"`.
        path: Layer or variable path (`"<model>"` / `"<optimizer>"` for global findings).
        problem: What is wrong.
        fix: How to fix it.
    """

    code: str
    severity: str
    path: str
    problem: str
    fix: str


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The findings of `tfmp.audit`, errors first.

    Attributes:
        findings: Errors first, then warnings, then infos.
        policy: The policy the model was judged against.
    """

    findings: tuple[Finding, ...]
    policy: str

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and infos allowed)."""
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "ok": self.ok,
            "policy": self.policy,
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }

    def __str__(self) -> str:
        head = f"tfmp audit (policy {self.policy}): "
        if not self.findings:
            return head + "no findings."
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        rows = [("severity", "path", "problem", "fix")]
        rows += [(f.severity, f.path, f.problem, f.fix) for f in self.findings]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head + ", ".join(f"{n} {s}(s)" for s, n in counts.items())]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
        return "\n".join(lines)


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _check_outputs(model: keras.Model, ctx: "_Context") -> None:
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
    mismatched: list[str] = []
    for path, layer in iter_layers(model):
        compute = layer.compute_dtype
        if is_softmax(layer) and compute in HALF_DTYPES:
            ctx.add("softmax-half", "warning", path, f"softmax computes in {compute}",
                    "give it dtype='float32' or use tfmp.layers.StableSoftmax")
        if (is_normalization(layer) and compute in HALF_DTYPES
                and not isinstance(layer, UPCASTING_NORMALIZATION)):
            ctx.add("normalization-half", "warning", path, f"normalization computes in {compute}",
                    "give it dtype='float32' or use tfmp.layers.StableLayerNorm")
        for var in _compat.own_variables(layer):
            if _dtype(var) in HALF_DTYPES:
                ctx.add("variable-not-float32", "error", var.path,
                        f"variable is {_dtype(var)}: updates smaller than its precision are lost",
                        "use a mixed_* policy (float32 variables) instead of a pure 16-bit dtype")
        if layer.dtype_policy.name != ctx.policy and not expected_to_differ(layer, outputs):
            mismatched.append(f"{path} ({layer.dtype_policy.name})")
        if ctx.align and id(layer) not in outputs:  # output sizes are set by the task
            _check_sizes(path, layer, ctx)
    if mismatched:
        shown = ", ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
        ctx.add("policy-mismatch", "warning", mismatched[0].split(" ")[0],
                f"{len(mismatched)} layer(s) use another policy than the global "
                f"{ctx.policy} (was the policy set after the model was built?): {shown}",
                "build the model after tfmp.set_policy(), or use tfmp.prepare()")


def _check_sizes(path: str, layer: keras.layers.Layer, ctx: "_Context") -> None:
    for attr in ("units", "filters", "output_dim"):
        size = getattr(layer, attr, None)
        if isinstance(size, int) and size % ctx.align:
            ctx.add("size-not-aligned", "info", path,
                    f"{attr}={size} is not a multiple of {ctx.align} ({ctx.hardware.accelerator})",
                    f"round {attr} to a multiple of {ctx.align} for full-speed matmuls")


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
    compute_dtypes: set[str]  # of every layer, nested ones included
    findings: list[Finding] = dataclasses.field(default_factory=list)

    def add(self, *args: str) -> None:
        self.findings.append(Finding(*args))


CHECKS: tuple[Callable[[keras.Model, _Context], None], ...] = (_check_outputs, _check_layers)


def audit(
    model: keras.Model,
    optimizer: Optional[keras.optimizers.Optimizer] = None,
    hardware: Optional[HardwareInfo] = None,
    *,
    policy: Optional[str] = None,
) -> AuditReport:
    """Checks what runs in which precision and reports what is wrong.

    Args:
        model: A Keras model (subclassed models get a partial audit).
        optimizer: The optimizer to check; defaults to `model.optimizer` if compiled.
        hardware: The hardware to judge for; detected when omitted.
        policy: The policy the model is meant to run under (layers under another one
            are reported); default Keras' global policy. `tfmp.rewrite.model_policy(model)`
            audits a saved model against the policy it was built with.

    Returns:
        An `AuditReport`: `report.ok`, `report.errors`, `str(report)` (a table),
        `report.to_dict()` (JSON).

    Example:
    >>> report = tfmp.audit(model, optimizer)
    >>> print(report)
    >>> assert report.ok, report.errors
    """
    hw = hardware if hardware is not None else detect_hardware()
    policy = policy or global_policy_name()
    align = {"tpu": 128, "gpu": 8}.get(hw.accelerator, 0)
    ctx = _Context(policy, hw, align, {l.compute_dtype for _, l in iter_layers(model)})
    for check in CHECKS:
        check(model, ctx)
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    _check_optimizer(model, optimizer, ctx)
    if hw.accelerator == "tpu" and "float16" in ctx.compute_dtypes:
        ctx.add("fp16-on-tpu", "error", "<model>",
                "float16 layers on TPU: TPUs pair bfloat16 with float32, not float16",
                "use mixed_bfloat16 (tfmp.set_policy('bf16'))")
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings = sorted(ctx.findings, key=lambda f: order[f.severity])
    return AuditReport(tuple(findings), policy)

