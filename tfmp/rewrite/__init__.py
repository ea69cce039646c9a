"""What a model computes in which precision, and changing it.

`audit` reports what runs in which precision and what is wrong with it;
`enforce_float32` copies a model with float32 outputs, normalization and softmax;
`convert_policy` makes it compute under another policy; `locate_overflows` finds the
layers that leave a 16-bit range; `prepare` does all of it and wraps the optimizer; `islands` computes the activations that are slower in 16 bits
in float32. `classify` (what a layer is), `tracing` (what a model runs, op by op),
`cloning` (the copy of a Sequential or Functional model), `inplace` (the
conversion of every other kind) and `storage` (16-bit weights, `prepare`'s
`weights_dtype`) are the engine underneath.
"""

from tfmp.rewrite.audit_report import SEVERITIES, AuditReport, Finding, LayerSummary
from tfmp.rewrite.auditing import audit
from tfmp.rewrite.classify import (HALF_DTYPES, is_normalization, is_plain_model, is_softmax,
                                   iter_layers, kept_float32, model_policy, output_layers)
from tfmp.rewrite.cloning import (ConfigRoundTripError, cast_op_outputs, clone_with_dtypes,
                                  policy_rule, rebuild_under_policy)
from tfmp.rewrite.enforcement import LayerSpec, enforce_float32, float32_selector, layer_matcher
from tfmp.rewrite.islands import ISLANDS, Island, apply_islands, float32_gelu, float32_selu, float32_sigmoid
from tfmp.rewrite.inplace import cast_outputs_to_float32, convert_in_place, is_copyable, set_policies
from tfmp.rewrite.conversion import convert_policy
from tfmp.rewrite.overflow_report import LayerOverflow, OverflowReport
from tfmp.rewrite.overflows import locate_overflows
from tfmp.rewrite.preparation import AuditError, prepare
from tfmp.rewrite.tracing import (LayerRun, ModelRun, Op, example_inputs, first_input_spec,
                                  run_model, split_batch)

__all__ = [
    "apply_islands", "audit", "AuditError", "AuditReport", "cast_op_outputs",
    "cast_outputs_to_float32", "clone_with_dtypes", "ConfigRoundTripError", "convert_in_place",
    "convert_policy", "enforce_float32", "example_inputs", "Finding", "first_input_spec", "float32_gelu",
    "float32_selector", "float32_selu", "float32_sigmoid", "HALF_DTYPES", "is_copyable",
    "is_normalization", "is_plain_model", "layer_matcher", "LayerOverflow", "locate_overflows",
    "OverflowReport", "is_softmax", "Island", "ISLANDS", "iter_layers", "kept_float32",
    "LayerRun", "LayerSpec", "LayerSummary", "model_policy", "ModelRun", "Op", "output_layers", "policy_rule",
    "prepare", "rebuild_under_policy", "run_model", "set_policies", "SEVERITIES", "split_batch",
]
