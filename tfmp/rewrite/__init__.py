"""What a model computes in which precision, and changing it.

`audit` reports what runs in which precision and what is wrong with it;
`enforce_float32` copies a model with float32 outputs, normalization and softmax;
`convert_policy` rebuilds it under another policy; `prepare` does all of it and
wraps the optimizer; `islands` computes the activations that are slower in 16 bits
in float32. `classify` (what a layer is) and `cloning` (the copy every other
part makes) are the engine underneath.
"""

from tfmp.rewrite.auditing import SEVERITIES, AuditReport, Finding, audit
from tfmp.rewrite.classify import (HALF_DTYPES, is_normalization, is_plain_model, is_softmax,
                                   iter_layers, model_policy, output_layers)
from tfmp.rewrite.cloning import cast_op_outputs, clone_with_dtypes, rebuild_under_policy
from tfmp.rewrite.enforcement import LayerSpec, enforce_float32, float32_selector
from tfmp.rewrite.islands import ISLANDS, Island, apply_islands, float32_gelu, float32_selu, float32_sigmoid
from tfmp.rewrite.preparation import AuditError, convert_policy, prepare

__all__ = [
    "AuditError", "AuditReport", "Finding", "HALF_DTYPES", "ISLANDS", "Island", "LayerSpec",
    "SEVERITIES", "apply_islands", "audit", "cast_op_outputs", "clone_with_dtypes",
    "convert_policy", "enforce_float32", "float32_gelu", "float32_selector", "float32_selu",
    "float32_sigmoid", "is_normalization", "is_plain_model", "is_softmax", "iter_layers",
    "model_policy", "output_layers", "prepare", "rebuild_under_policy",
]
