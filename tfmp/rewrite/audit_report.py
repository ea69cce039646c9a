"""`AuditReport`: what `tfmp.audit` found and what the model ran, as a table and as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

SEVERITIES = ("error", "warning", "info")


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One layer as it ran (a row of `AuditReport.layer_table()`).

    Attributes:
        path: Its path in the model (`<model>`: the model's own ops).
        class_name: Its class.
        policy: Its dtype policy.
        output_dtypes: The dtypes of its outputs.
        flops: Matmul and convolution FLOPs of its own ops (one traced batch).
        half_flops: The part of `flops` computed in float16 or bfloat16.
    """

    path: str
    class_name: str
    policy: str
    output_dtypes: tuple[str, ...]
    flops: int
    half_flops: int


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
        layers: Every layer as it ran (empty when the model could not be run).
        input_shapes: The shapes the model was run on.
        flops: Matmul and convolution FLOPs of one traced batch.
        half_flops_share: The share of `flops` computed in 16 bits (None: no such op, or not run).
    """

    findings: tuple[Finding, ...]
    policy: str
    layers: tuple[LayerSummary, ...] = ()
    input_shapes: tuple[tuple[int, ...], ...] = ()
    flops: int = 0
    half_flops_share: Optional[float] = None

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
            "input_shapes": [list(s) for s in self.input_shapes],
            "flops": self.flops,
            "half_flops_share": self.half_flops_share,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }

    def layer(self, path: str) -> LayerSummary:
        """The row of the layer at `path` (KeyError: no such layer ran)."""
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(f"no layer at {path!r} ran")

    def summary(self) -> str:
        """One line: what ran in 16 bits, by matmul and convolution FLOPs."""
        if not self.layers:
            return "not run"
        shapes = ", ".join(str(tuple(s)) for s in self.input_shapes)
        if self.half_flops_share is None:
            return f"ran on inputs {shapes}: no matmul or convolution"
        return (f"ran on inputs {shapes}: {100 * self.half_flops_share:.1f}% of the "
                f"{_flops_text(self.flops)} of matmuls and convolutions in 16 bits")

    def layer_table(self) -> str:
        """Every layer as it ran: path, class, policy, output dtypes, FLOPs in 16 bits."""
        rows = [("path", "class", "policy", "output", "matmul/conv", "in 16 bits")]
        for layer in self.layers:
            share = f"{100 * layer.half_flops / layer.flops:.0f}%" if layer.flops else "-"
            rows.append((layer.path, layer.class_name, layer.policy,
                         ",".join(layer.output_dtypes) or "-",
                         _flops_text(layer.flops) if layer.flops else "-", share))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        head = f"tfmp audit (policy {self.policy}): "
        if not self.findings:
            return head + f"no findings; {self.summary()}."
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        rows = [("severity", "path", "problem", "fix")]
        rows += [(f.severity, f.path, f.problem, f.fix) for f in self.findings]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head + ", ".join(f"{n} {s}(s)" for s, n in counts.items()) + f"; {self.summary()}"]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
        return "\n".join(lines)


def _flops_text(flops: int) -> str:
    for unit, size in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops} FLOPs"
