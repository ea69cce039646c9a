"""tfmp: mixed-precision training for TensorFlow and Keras 3.

The names a Keras user calls are here; the rest lives in namespaces, each one
concern: `precision` (policies, hardware), `scaling` (the loss-scale optimizer),
`rewrite` (what a model computes in which precision, and changing it), `layers`,
`callbacks`, `measure` (compare, tune), `distribute` (strategies, clusters, the
launcher), `litert` (export), `weights` (16-bit release weights), `compensation` (16-bit
weights that still learn). The training job behind the binaries is `tfmp.app`,
which `import tfmp` does not load.
"""

from tfmp._tf_check import require_tensorflow as _require_tensorflow

_require_tensorflow()

import os as _os

# tfmp drives Keras on TensorFlow (strategies, tf.data, checkpoints).
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfmp import (callbacks, compensation, distribute, layers, litert, measure, precision, rewrite,
                  scaling, weights)
from tfmp.callbacks import NonFiniteError
from tfmp.compensation import compensate
from tfmp.distribute import get_strategy, split_cpu
from tfmp.litert import export
from tfmp.measure import compare_precision, tune
from tfmp.precision import HardwareInfo, detect_hardware, policy_scope, resolve_policy, set_policy
from tfmp.preparation import AuditError, prepare
from tfmp.rewrite import audit, convert_policy, enforce_float32, locate_overflows
from tfmp.scaling import (DynamicLossScaleOptimizer, get_unscaled_gradients, guard_model_state,
                          wrap_optimizer)
from tfmp.weights import load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    # precision policies
    "set_policy", "policy_scope", "resolve_policy", "detect_hardware", "HardwareInfo",
    # a model and its optimizer, made mixed-precision ready
    "prepare", "convert_policy", "enforce_float32", "audit", "AuditError", "locate_overflows",
    # loss scaling
    "wrap_optimizer", "DynamicLossScaleOptimizer", "get_unscaled_gradients", "guard_model_state",
    "NonFiniteError",
    # 16-bit weights that still learn
    "compensate",
    # measuring, distributing, deploying
    "compare_precision", "tune", "get_strategy", "split_cpu", "export",
    # 16-bit release weights
    "save_weights", "load_weights",
    # namespaces
    "callbacks", "compensation", "distribute", "layers", "litert", "measure", "precision", "rewrite", "scaling",
    "weights",
]
