"""Float32 islands: activations that are slower in 16 bits on some hardware run in float32.

On a CPU, oneDNN computes matmuls and convolutions fast in bfloat16, but some
element-wise activations are slower in bfloat16 than in float32 (they are
computed through float32 internally, with extra conversions). For those, the
activation of a layer is replaced by the same function computed in float32 and
cast back to the layer's compute dtype: the model computes the same thing, at
the activation's precision, faster. `ISLANDS` holds what was measured (the figures, and
the machine: BENCHMARKS.md, "Float32 islands"); `tfmp.prepare` applies it (`apply_islands`)
to the model it returns.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras
from keras import ops

from tfmp import _compat
from tfmp.precision import HardwareInfo
from tfmp.precision.policy import MIXED_BFLOAT16, parse_precision


def in_float32(activation: Callable) -> Callable:
    """`activation` computed in float32 and returned in its input's dtype, registered with Keras
    as `tfmp>float32_<name>` so that saved models using it load after `import tfmp`.

    Args:
        activation: A Keras activation function.

    Returns:
        The float32 island of `activation`.
    """

    def island(x):
        return ops.cast(activation(ops.cast(x, "float32")), x.dtype)

    island.__name__ = island.__qualname__ = f"float32_{activation.__name__}"
    island.__doc__ = (f"`keras.activations.{activation.__name__}` computed in float32.\n\n"
                      "Args:\n    x: A tensor.\n\nReturns:\n    The activation of `x`, in `x`'s dtype.")
    return keras.saving.register_keras_serializable(package="tfmp")(island)


float32_gelu = in_float32(keras.activations.gelu)  # exact GELU, as Keras' default
float32_sigmoid = in_float32(keras.activations.sigmoid)
float32_selu = in_float32(keras.activations.selu)


def _cpu_bfloat16(hw: HardwareInfo, policy: str) -> bool:
    return hw.accelerator == "cpu" and policy == MIXED_BFLOAT16


@dataclasses.dataclass(frozen=True)
class Island:
    """One activation that runs faster in float32 under some policy on some hardware.

    Attributes:
        activation: The Keras activation function replaced.
        replacement: The same function computed in float32 (registered, so saved models load).
        applies: `(hardware, policy) -> bool`.
        measured: What was measured, for the log (the figures: BENCHMARKS.md, "Float32 islands").
    """

    activation: Callable
    replacement: Callable
    applies: Callable[[HardwareInfo, str], bool]
    measured: str


ISLANDS: tuple[Island, ...] = (
    Island(keras.activations.gelu, float32_gelu, _cpu_bfloat16,
           "CPU bfloat16 gelu slower than float32, faster in float32 and cast back"),
    Island(keras.activations.sigmoid, float32_sigmoid, _cpu_bfloat16,
           "CPU bfloat16 sigmoid slower than float32, faster in float32 and cast back"),
    Island(keras.activations.selu, float32_selu, _cpu_bfloat16,
           "CPU bfloat16 selu slower than float32, faster in float32 and cast back"),
)


def apply_islands(model: keras.Model, policy: str, hardware: HardwareInfo,
                  islands: tuple[Island, ...] = ISLANDS) -> list[str]:
    """Replaces, in place, the activations of `model`'s layers that `islands` name.

    Only layers computing in 16 bits are changed (a float32 layer has nothing to
    gain). Call it on a model that is yours to change: `tfmp.prepare` calls it
    on the copy it returns.

    Args:
        model: A Keras model (nested layers included).
        policy: The precision policy the model runs under (any accepted name).
        hardware: The hardware it runs on.
        islands: The table to apply (default `ISLANDS`).

    Returns:
        One `"layer_name: activation -> replacement"` entry per changed layer.
    """
    active = [i for i in islands if i.applies(hardware, parse_precision(policy))]
    changed = []
    for layer in _compat.flatten_layers(model, include_self=False):
        activation = getattr(layer, "activation", None)
        if layer.compute_dtype == "float32" or activation is None:
            continue
        for island in active:
            if activation is island.activation:
                layer.activation = island.replacement
                changed.append(f"{layer.name}: {activation.__name__} -> "
                               f"{island.replacement.__name__}")
    return changed
