"""tfmp: mixed-precision training for TensorFlow and Keras 3.

Every public name is exported here.
"""

from tfmp._tf_check import require_tensorflow as _require_tensorflow

_require_tensorflow()

import os as _os

# tfmp drives Keras on TensorFlow (strategies, tf.data, checkpoints).
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfmp import callbacks, cluster, islands, launch, layers, litert, state_guard
from tfmp.callbacks import NonFiniteError
from tfmp.audits import AuditReport, Finding, audit
from tfmp.compare import Comparison, compare_precision
from tfmp.enforce import enforce_float32
from tfmp.export import ExportError, ExportReport, export
from tfmp.loss_scale import DynamicLossScaleOptimizer
from tfmp.prepare import AuditError, convert_policy, prepare
from tfmp.state_guard import guard_model_state
from tfmp.hardware import AUTO_RULES, HardwareInfo, detect_hardware, recommend_policy
from tfmp.policy import (
    ACCEPTED_NAMES,
    ENV_VAR,
    POLICIES,
    PolicyChoice,
    global_policy_name,
    parse_precision,
    policy_scope,
    resolve_policy,
    set_policy,
)

from tfmp.tune import TuneResult, tune
from tfmp.strategy import STRATEGIES, get_strategy, parse_strategy, split_cpu
from tfmp.wrapping import get_unscaled_gradients, parse_loss_scale, wrap_optimizer

__version__ = "0.1.0"

__all__ = [
    "ACCEPTED_NAMES",
    "AuditError",
    "AuditReport",
    "Finding",
    "DynamicLossScaleOptimizer",
    "AUTO_RULES",
    "ENV_VAR",
    "HardwareInfo",
    "NonFiniteError",
    "POLICIES",
    "STRATEGIES",
    "PolicyChoice",
    "audit",
    "callbacks",
    "Comparison",
    "compare_precision",
    "convert_policy",
    "detect_hardware",
    "enforce_float32",
    "export",
    "ExportError",
    "ExportReport",
    "get_unscaled_gradients",
    "get_strategy",
    "global_policy_name",
    "guard_model_state",
    "parse_loss_scale",
    "parse_precision",
    "parse_strategy",
    "cluster",
    "islands",
    "launch",
    "layers",
    "litert",
    "policy_scope",
    "prepare",
    "recommend_policy",
    "resolve_policy",
    "set_policy",
    "split_cpu",
    "tune",
    "TuneResult",
    "wrap_optimizer",
]
