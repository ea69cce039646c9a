"""Precision policies and the hardware they are chosen for.

`set_policy` / `policy_scope` set Keras' global dtype policy from any accepted
name; `auto` is decided from a `HardwareInfo` (`detect_hardware`) by the rule
table `AUTO_RULES`; `trap_warnings` says when a policy works but is slow there.
The only global state is the one Keras keeps (`keras.config.dtype_policy()`).
"""

from tfmp.precision.hardware import (
    AUTO_RULES,
    BF16_CPU_FEATURES,
    CPU_FEATURES,
    HardwareInfo,
    Rule,
    detect_hardware,
    read_cpu_features,
    recommend_policy,
)
from tfmp.precision.policy import (
    ACCEPTED_NAMES,
    AUTO,
    ENV_VAR,
    FLOAT32,
    MIXED_BFLOAT16,
    MIXED_FLOAT16,
    POLICIES,
    TRAPS,
    PolicyChoice,
    Trap,
    global_policy_name,
    parse_precision,
    policy_scope,
    resolve_policy,
    set_policy,
    trap_warnings,
)
from tfmp.precision.ranges import FLOAT16_TINY, HALF_MAX

__all__ = [
    "ACCEPTED_NAMES", "AUTO", "AUTO_RULES", "BF16_CPU_FEATURES", "CPU_FEATURES", "ENV_VAR",
    "FLOAT16_TINY", "FLOAT32", "HALF_MAX", "HardwareInfo",
    "MIXED_BFLOAT16", "MIXED_FLOAT16", "POLICIES", "PolicyChoice", "Rule", "TRAPS", "Trap",
    "detect_hardware", "global_policy_name", "parse_precision", "policy_scope",
    "read_cpu_features", "recommend_policy", "resolve_policy", "set_policy", "trap_warnings",
]
