"""Hardware detection and the rule table behind the `auto` precision policy.

`detect_hardware()` reads what TensorFlow and `/proc/cpuinfo` report and
returns a frozen `HardwareInfo`. The `auto` decision is a pure function of that
value (`recommend_policy`), driven by `AUTO_RULES`, so it can be tested with
hand-made `HardwareInfo` values for hardware this machine does not have.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import tensorflow as tf

ACCELERATORS = ("tpu", "gpu", "cpu")
# CPU flags (as spelled in /proc/cpuinfo) that change what precision is fast.
CPU_FEATURES = ("amx_bf16", "avx512_bf16", "avx512_fp16")
BF16_CPU_FEATURES = frozenset({"amx_bf16", "avx512_bf16"})  # bfloat16 arithmetic in hardware


@dataclasses.dataclass(frozen=True)
class HardwareInfo:
    """What the training devices are, as far as precision is concerned.

    Attributes:
        accelerator: `"tpu"`, `"gpu"` or `"cpu"`: the device kind training runs on.
        devices: Names of the devices of that kind (e.g. `("/physical_device:GPU:0",)`).
        gpu_compute_capabilities: One `(major, minor)` per GPU; `None` for a GPU
            that does not report one (non-NVIDIA builds).
        cpu_features: The `CPU_FEATURES` flags the host CPU has.
    """

    accelerator: str = "cpu"
    devices: tuple[str, ...] = ()
    gpu_compute_capabilities: tuple[Optional[tuple[int, int]], ...] = ()
    cpu_features: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ValueError(
                f"HardwareInfo.accelerator={self.accelerator!r} is not one of "
                f"{', '.join(ACCELERATORS)}."
            )
        unknown = set(self.cpu_features) - set(CPU_FEATURES)
        if unknown:
            raise ValueError(
                f"HardwareInfo.cpu_features has unknown flags {sorted(unknown)}; "
                f"known flags: {', '.join(CPU_FEATURES)}."
            )
        object.__setattr__(self, "cpu_features", frozenset(self.cpu_features))

    @property
    def recommended_policy(self) -> str:
        """The canonical policy name `auto` resolves to on this hardware."""
        return recommend_policy(self)[0]

    @property
    def reason(self) -> str:
        """One sentence saying why `recommended_policy` was chosen."""
        return recommend_policy(self)[1]

    def describe(self) -> str:
        """A short multi-line, human-readable description."""
        lines = [f"accelerator: {self.accelerator}"]
        if self.devices:
            lines.append(f"devices: {', '.join(self.devices)}")
        if self.accelerator == "gpu":
            caps = [_format_cc(cc) for cc in self.gpu_compute_capabilities]
            lines.append(f"gpu compute capabilities: {', '.join(caps) or 'unknown'}")
        features = ", ".join(sorted(self.cpu_features)) or "none"
        lines.append(f"cpu 16-bit features: {features}")
        lines.append(f"recommended policy: {self.recommended_policy}")
        lines.append(f"why: {self.reason}")
        return "\n".join(lines)


def _format_cc(cc: Optional[tuple[int, int]]) -> str:
    return "unknown" if cc is None else f"{cc[0]}.{cc[1]}"


def _min_cc(hw: HardwareInfo) -> Optional[tuple[int, int]]:
    """Smallest compute capability over all GPUs; None if any is unknown."""
    caps = hw.gpu_compute_capabilities
    if not caps or any(cc is None for cc in caps):
        return None
    return min(caps)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the `auto` table: the first rule whose `applies` is true wins.

    Attributes:
        name: A short name for the row.
        applies: `HardwareInfo -> bool`.
        policy: The canonical policy it picks.
        reason: One sentence saying why.
    """

    name: str
    applies: Callable[[HardwareInfo], bool]
    policy: str
    reason: str


def _cc_at_least(major: int, minor: int) -> Callable[[HardwareInfo], bool]:
    def check(hw: HardwareInfo) -> bool:
        cc = _min_cc(hw)
        return hw.accelerator == "gpu" and cc is not None and cc >= (major, minor)

    return check


AUTO_RULES: tuple[Rule, ...] = (
    Rule(
        "tpu",
        lambda hw: hw.accelerator == "tpu",
        "mixed_bfloat16",
        "TPUs compute natively in bfloat16 and do not support float16 well.",
    ),
    Rule(
        "gpu_ampere",
        _cc_at_least(8, 0),
        "mixed_bfloat16",
        "Every GPU has compute capability >= 8.0, so bfloat16 is fast and needs no loss scaling.",
    ),
    Rule(
        "gpu_tensor_cores",
        _cc_at_least(7, 0),
        "mixed_float16",
        "Every GPU has compute capability >= 7.0 (float16 Tensor Cores) but not all reach "
        "8.0 (fast bfloat16), so float16 with loss scaling is the fast choice.",
    ),
    Rule(
        "gpu_old",
        lambda hw: hw.accelerator == "gpu",
        "float32",
        "At least one GPU is older than compute capability 7.0 (or does not report one), "
        "so 16-bit compute would not be faster.",
    ),
    Rule(
        "cpu_bf16",
        lambda hw: bool(hw.cpu_features & BF16_CPU_FEATURES),
        "mixed_bfloat16",
        "The CPU has bfloat16 instructions (amx_bf16 or avx512_bf16), which oneDNN uses "
        "for fast bfloat16 matmuls.",
    ),
    Rule(
        "cpu_plain",
        lambda hw: True,
        "float32",
        "The CPU has no bfloat16 instructions and float16 is emulated (slow) on CPUs.",
    ),
)


def recommend_policy(
    hw: HardwareInfo, rules: Sequence[Rule] = AUTO_RULES
) -> tuple[str, str]:
    """The policy `auto` picks on `hw`: the first rule of `rules` that applies.

    Args:
        hw: The hardware.
        rules: The rule table (default `AUTO_RULES`).

    Returns:
        `(policy_name, reason)`.

    Raises:
        ValueError: no rule applies (a table without a catch-all last rule).
    """
    for rule in rules:
        if rule.applies(hw):
            return rule.policy, rule.reason
    raise ValueError(f"No auto-precision rule applies to {hw!r}.")


def read_cpu_features(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The `CPU_FEATURES` flags listed in `cpuinfo_path`.

    Args:
        cpuinfo_path: Where to read them (Linux's `/proc/cpuinfo`).

    Returns:
        The flags found; empty when the file cannot be read.
    """
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
                    return frozenset(f for f in CPU_FEATURES if f in flags)
    except OSError:
        pass
    return frozenset()


def detect_hardware(
    strategy: Optional[tf.distribute.Strategy] = None,
    cpuinfo_path: str = "/proc/cpuinfo",
) -> HardwareInfo:
    """Describes the devices training will run on.

    Args:
        strategy: If a `tf.distribute.TPUStrategy` is given, the accelerator is
            `"tpu"` (TPUs are only visible once the TPU system is initialized,
            which this function does not do).
        cpuinfo_path: Where to read the CPU flags from.

    Returns:
        A `HardwareInfo`. Its `recommended_policy` is what `auto` resolves to.

    Example:
    >>> hw = tfmp.detect_hardware()
    >>> print(hw.recommended_policy, "-", hw.reason)
    """
    cpu_features = read_cpu_features(cpuinfo_path)
    # Physical devices: listing logical ones would initialize TensorFlow's devices
    # (too early to split the CPU afterwards); TPUs show up once initialized.
    tpus = tf.config.list_physical_devices("TPU")
    if tpus or isinstance(strategy, tf.distribute.TPUStrategy):
        names = tuple(d.name for d in tpus)
        return HardwareInfo("tpu", names, (), cpu_features)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        caps = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            cc = details.get("compute_capability")
            caps.append(tuple(cc) if cc else None)
        names = tuple(g.name for g in gpus)
        return HardwareInfo("gpu", names, tuple(caps), cpu_features)
    cpus = tuple(d.name for d in tf.config.list_physical_devices("CPU"))
    return HardwareInfo("cpu", cpus, (), cpu_features)
