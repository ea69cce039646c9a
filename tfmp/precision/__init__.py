"""Precision policies and the hardware they are chosen for.

`set_policy` / `policy_scope` set Keras' global dtype policy from any accepted
name; `auto` is decided from a `HardwareInfo` (`detect_hardware`) by the rule
table `AUTO_RULES`; `policy.trap_warnings` says when a policy works but is slow there.
The only global state is the one Keras keeps (`keras.config.dtype_policy()`).
"""

from tfmp.precision.hardware import AUTO_RULES, HardwareInfo, detect_hardware
from tfmp.precision.policy import PolicyChoice, policy_scope, resolve_policy, set_policy

__all__ = ["AUTO_RULES", "HardwareInfo", "PolicyChoice", "detect_hardware", "policy_scope",
           "resolve_policy", "set_policy"]
