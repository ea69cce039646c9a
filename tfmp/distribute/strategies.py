"""Distribution strategies by name, the way TF Model Garden's binaries pick them."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
from absl import logging

from tfmp._messages import first_line
from tfmp.distribute import cluster
from tfmp.precision.hardware import HardwareInfo, detect_hardware

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu")
# Model Garden spellings.
_ALIASES = {"off": "default", "multi_worker": "multi_worker_mirrored"}


def parse_strategy(name: str) -> str:
    """The canonical strategy name for any accepted spelling (Model Garden's `off` included).

    Args:
        name: A strategy name, in any case.

    Returns:
        One of `STRATEGIES`.

    Raises:
        ValueError: an unknown name; the message lists the accepted ones.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; accepted: {', '.join(STRATEGIES + tuple(_ALIASES))}."
        )
    return key


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices (for MirroredStrategy on CPU).

    Must run before TensorFlow initializes its devices.

    Args:
        num_devices: Logical devices to make (1 leaves the CPU whole).

    Raises:
        ValueError: `num_devices` < 1, or TensorFlow's devices are already initialized.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_cpu_devices must be a positive integer; got {num_devices!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == num_devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        raise ValueError(
            f"Cannot split the CPU into {num_devices} devices: TensorFlow is already "
            f"initialized ({e})."
        ) from None


def _connect_tpu(tpu: Optional[str]) -> tf.distribute.Strategy:
    """TF's recipe: resolver, connect (unless local), initialize, TPUStrategy."""
    address = tpu or "local"
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="" if address == "local" else address
        )
        if address not in ("", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        first = first_line(e)
        raise ValueError(f"No TPU found at tpu={address!r}: {first}") from None
    return tf.distribute.TPUStrategy(resolver)


def _gpus() -> list[str]:
    return [f"/gpu:{i}" for i, _ in enumerate(tf.config.list_physical_devices("GPU"))]


def choose_strategy(hardware: HardwareInfo, tpu: Optional[str] = None) -> str:
    """What `auto` resolves to: TPU > several GPUs (mirrored) > one device.

    Args:
        hardware: The hardware training runs on.
        tpu: A TPU address given on the command line (then always `tpu`).

    Returns:
        A canonical strategy name.
    """
    if tpu or hardware.accelerator == "tpu":
        return "tpu"
    if hardware.accelerator == "gpu" and len(hardware.devices) > 1:
        return "mirrored"
    return "one_device"


def get_strategy(name: str = "auto", tpu: Optional[str] = None,
                 cluster_timeout: float = cluster.DEFAULT_TIMEOUT) -> tf.distribute.Strategy:
    """Builds a `tf.distribute.Strategy` from its name.

    Args:
        name: `auto` (TPU if `tpu` is given or a TPU is visible, else mirrored
            over several GPUs, else one device), `default`, `one_device`,
            `mirrored` (all GPUs, or all logical CPUs when there is no GPU),
            `multi_worker_mirrored` (cluster from `TF_CONFIG`) or `tpu`.
            Model Garden's `off` means `default`.
        tpu: TPU address, or `local` on a TPU VM (the default for `tpu`).
        cluster_timeout: `multi_worker_mirrored`: seconds to wait for every worker
            (`tfmp.distribute.connect`: one line, then the process exits with status 2).

    Returns:
        The strategy; build and compile the model under `strategy.scope()`.

    Raises:
        ValueError: unknown name, `tpu` requested and no TPU reachable, a bad
            `TF_CONFIG` or a port in use (one line).

    Example:
    >>> strategy = tfmp.get_strategy("mirrored")
    >>> with strategy.scope():
    ...     model = build_model()
    """
    name = parse_strategy(name)
    if name == "auto":
        name = choose_strategy(detect_hardware(), tpu)
        logging.info("tfmp: strategy auto -> %s", name)
    if name == "tpu":
        return _connect_tpu(tpu)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy((_gpus() or ["/cpu:0"])[0])
    if name == "mirrored":
        devices = _gpus() or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return cluster.connect(cluster_timeout)


def xla_refusal(strategy: Optional[tf.distribute.Strategy]) -> Optional[str]:
    """Why `jit_compile=True` cannot train under `strategy` in Keras 3.15, or None if it can.

    A MirroredStrategy or MultiWorkerMirroredStrategy over several replicas fails there
    (a graph execution error on CPU in every precision; keras-team/keras#21366 with loss
    scaling on GPU). One device, OneDeviceStrategy and TPUStrategy (always XLA) can.

    Args:
        strategy: The strategy the model trains under (None: the default strategy).

    Returns:
        A clause to follow "XLA " or "--jit_compile ": `with <strategy> over <n> replicas
        fails in Keras 3.15 (...)`; None when XLA can run.
    """
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    if isinstance(strategy, mirrored) and strategy.num_replicas_in_sync > 1:
        return (f"with {type(strategy).__name__} over "
                f"{strategy.num_replicas_in_sync} replicas fails in Keras 3.15 (graph execution "
                "error on CPU in every precision; keras-team/keras#21366 with loss scaling on GPU)")
    return None
