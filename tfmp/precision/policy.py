"""Precision policies: one parser for every accepted name, `auto`, and traps.

The only global state is the one Keras keeps (`keras.config.dtype_policy()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Callable, Iterator, Optional, Union

import keras
from absl import logging

from tfmp._messages import warn
from tfmp.precision.hardware import HardwareInfo, detect_hardware

ENV_VAR = "TFMP_PRECISION"
AUTO = "auto"
MIXED_FLOAT16 = "mixed_float16"
MIXED_BFLOAT16 = "mixed_bfloat16"
FLOAT32 = "float32"
POLICIES = (MIXED_FLOAT16, MIXED_BFLOAT16, FLOAT32)

# Every accepted spelling -> canonical name. Model Garden's --dtype values
# (fp16/bf16/fp32) are here too.
_ALIASES: dict[str, str] = {
    AUTO: AUTO,
    MIXED_FLOAT16: MIXED_FLOAT16,
    "fp16": MIXED_FLOAT16,
    "float16": MIXED_FLOAT16,
    MIXED_BFLOAT16: MIXED_BFLOAT16,
    "bf16": MIXED_BFLOAT16,
    "bfloat16": MIXED_BFLOAT16,
    FLOAT32: FLOAT32,
    "fp32": FLOAT32,
}
ACCEPTED_NAMES: tuple[str, ...] = tuple(_ALIASES)


def parse_precision(name: str) -> str:
    """Maps any accepted spelling to `auto` or a canonical policy name.

    Args:
        name: One of `ACCEPTED_NAMES` (case and surrounding spaces ignored).

    Returns:
        `"auto"`, `"mixed_float16"`, `"mixed_bfloat16"` or `"float32"`.

    Raises:
        ValueError: `name` is not accepted; the message lists every accepted name.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        raise ValueError(
            f"Unknown precision {name!r}; accepted: {', '.join(ACCEPTED_NAMES)}."
        )
    return _ALIASES[key]


@dataclasses.dataclass(frozen=True)
class PolicyChoice:
    """A resolved policy and why it was chosen.

    Attributes:
        name: Canonical policy name (`mixed_float16`, `mixed_bfloat16`, `float32`).
        reason: One sentence saying why.
        source: `"explicit"` (asked for by name), `"env"` (`TFMP_PRECISION`
            overrode `auto`) or `"auto"` (chosen from the hardware).
    """

    name: str
    reason: str
    source: str


def resolve_policy(
    name: str = AUTO, hardware: Optional[HardwareInfo] = None
) -> PolicyChoice:
    """Resolves a precision name (possibly `auto`) to a `PolicyChoice`.

    `auto` is overridden by the `TFMP_PRECISION` environment variable when it is
    set; otherwise it follows the hardware (`tfmp.precision.hardware.AUTO_RULES`).

    Args:
        name: Any name `parse_precision` accepts (default `auto`).
        hardware: The hardware `auto` decides for; detected when omitted.

    Returns:
        A `PolicyChoice`: the canonical name, why, and where the choice came from.

    Raises:
        ValueError: `name`, or the value of `TFMP_PRECISION`, is not accepted.
    """
    canonical = parse_precision(name)
    if canonical != AUTO:
        return PolicyChoice(canonical, f"{name!r} was asked for explicitly.", "explicit")
    env_value = os.environ.get(ENV_VAR, "").strip()
    if env_value:
        try:
            from_env = parse_precision(env_value)
        except ValueError as e:
            raise ValueError(f"Environment variable {ENV_VAR}: {e}") from None
        if from_env != AUTO:
            return PolicyChoice(from_env, f"{ENV_VAR}={env_value} overrides auto.", "env")
    hw = hardware if hardware is not None else detect_hardware()
    return PolicyChoice(hw.recommended_policy, hw.reason, "auto")


@dataclasses.dataclass(frozen=True)
class Trap:
    """A policy that works but is a bad idea on some hardware.

    Attributes:
        policy: The canonical policy name.
        applies: `HardwareInfo -> bool`.
        message: The warning, one sentence naming what to use instead.
    """

    policy: str
    applies: Callable[[HardwareInfo], bool]
    message: str


def _gpu_below_ampere(hw: HardwareInfo) -> bool:
    caps = hw.gpu_compute_capabilities
    return hw.accelerator == "gpu" and any(cc is None or cc < (8, 0) for cc in caps)


TRAPS: tuple[Trap, ...] = (
    Trap(
        MIXED_FLOAT16,
        lambda hw: hw.accelerator == "cpu",
        "mixed_float16 on a CPU-only host is a trap: float16 is emulated on CPUs "
        "(a dense Keras model trained ~280x slower than in float32 without XLA). "
        "Use mixed_bfloat16 (CPU with avx512_bf16/amx_bf16) or float32.",
    ),
    Trap(
        MIXED_FLOAT16,
        lambda hw: hw.accelerator == "tpu",
        "mixed_float16 on TPU is a trap: TPUs pair bfloat16 with float32, not float16, "
        "and the loss scaling is wasted work. Use mixed_bfloat16.",
    ),
    Trap(
        MIXED_BFLOAT16,
        _gpu_below_ampere,
        "mixed_bfloat16 on a GPU below compute capability 8.0 is a trap: bfloat16 "
        "is emulated there and slower than float32. Use mixed_float16 (>= 7.0) or float32.",
    ),
)


def trap_warnings(policy: str, hardware: HardwareInfo) -> list[str]:
    """The messages of every `TRAPS` entry that `policy` falls into on `hardware`.

    Args:
        policy: Any accepted policy name.
        hardware: The hardware it would run on.

    Returns:
        One message per trap (empty: the policy is a sound choice there).

    Raises:
        ValueError: `policy` is not accepted.
    """
    canonical = parse_precision(policy)
    return [t.message for t in TRAPS if t.policy == canonical and t.applies(hardware)]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warn(message, stacklevel=3)  # at the call of set_policy


def set_policy(name: Union[str, PolicyChoice] = AUTO,
               hardware: Optional[HardwareInfo] = None) -> str:
    """Sets Keras' global dtype policy.

    Args:
        name: `auto` (default), `mixed_float16` (`fp16`, `float16`),
            `mixed_bfloat16` (`bf16`, `bfloat16`) or `float32` (`fp32`).
            `auto` follows `TFMP_PRECISION` if set, else the hardware. A
            `PolicyChoice` from `resolve_policy` is set as it is (its reason logged).
        hardware: The hardware to decide for; detected when omitted.

    Returns:
        The canonical name of the policy that was set.

    Raises:
        ValueError: `name` (or `TFMP_PRECISION`) is not an accepted name.

    Example:
    >>> tfmp.set_policy("bf16")
    'mixed_bfloat16'
    """
    hw = hardware if hardware is not None else detect_hardware()
    choice = name if isinstance(name, PolicyChoice) else resolve_policy(name, hw)
    for message in trap_warnings(choice.name, hw):
        _warn_once(message)
    # A decision (auto, the environment, a measurement) is always said with its reason,
    # also when it keeps the current policy (auto -> float32 on a CPU without bf16).
    if choice.source != "explicit" or keras.config.dtype_policy().name != choice.name:
        logging.info("tfmp: precision policy %s (%s)", choice.name, choice.reason)
    keras.config.set_dtype_policy(choice.name)
    return choice.name


def global_policy_name() -> str:
    """The name of Keras' current global dtype policy.

    Returns:
        The name (`float32`, `mixed_bfloat16`, ...).
    """
    return keras.config.dtype_policy().name


@contextlib.contextmanager
def policy_scope(
    name: str, hardware: Optional[HardwareInfo] = None
) -> Iterator[str]:
    """Sets the global policy for a `with` block and restores the previous one.

    The previous policy is restored on exit, also when the block raises.

    Args:
        name: Any name `set_policy` accepts.
        hardware: The hardware `auto` decides for; detected when omitted.

    Yields:
        The canonical name of the policy set.

    Raises:
        ValueError: `name` is not accepted.

    Example:
    >>> with tfmp.policy_scope("bf16"):
    ...     model = build_model()  # layers compute in bfloat16
    """
    previous = keras.config.dtype_policy()
    try:
        yield set_policy(name, hardware)
    finally:
        keras.config.set_dtype_policy(previous)
