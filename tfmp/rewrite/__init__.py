"""What a model computes in which precision, and changing it.

`audit` reports what runs in which precision and what is wrong with it;
`enforce_float32` copies a model with float32 outputs, normalization and softmax;
`convert_policy` makes it compute under another policy; `locate_overflows` finds the
layers that leave a 16-bit range; `islands` computes the activations that are slower in 16
bits in float32 (`tfmp.prepare`, in `tfmp.preparation`, does all of it and wraps the optimizer). `classify` (what a layer is), `tracing` (what a model runs, op by op),
`cloning` (the copy of a Sequential or Functional model), `inplace` (the
conversion of every other kind) and `storage` (16-bit weights, `prepare`'s
`weights_dtype`) are the engine underneath.
"""

from tfmp.rewrite.audit_report import AuditReport, Finding
from tfmp.rewrite.auditing import audit
from tfmp.rewrite.classify import kept_float32
from tfmp.rewrite.conversion import convert_policy
from tfmp.rewrite.enforcement import enforce_float32
from tfmp.rewrite.islands import ISLANDS, apply_islands, float32_gelu, float32_selu, float32_sigmoid
from tfmp.rewrite.overflow_report import LayerOverflow, OverflowReport
from tfmp.rewrite.overflows import locate_overflows
from tfmp.rewrite.tracing import ModelRun, run_model

__all__ = ["AuditReport", "Finding", "ISLANDS", "LayerOverflow", "ModelRun", "OverflowReport",
           "apply_islands", "audit", "convert_policy", "enforce_float32", "float32_gelu",
           "float32_selu", "float32_sigmoid", "kept_float32", "locate_overflows", "run_model"]
