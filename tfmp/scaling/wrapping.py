"""`wrap_optimizer` and the custom-training-loop helper for unscaled gradients."""

from __future__ import annotations

import difflib
import inspect
import math
import reprlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import keras
from absl import logging

from tfmp.precision.policy import MIXED_BFLOAT16, MIXED_FLOAT16, parse_precision, resolve_policy
from tfmp.scaling.half_weights import checked_weights_dtype, class_restorer, compensated_for
from tfmp.scaling.optimizer import DynamicLossScaleOptimizer

LossScale = Union[str, float, int]

# What `**scale_args` may hold: `DynamicLossScaleOptimizer`'s own arguments.
SCALE_ARGS = tuple(
    name for name, parameter in inspect.signature(DynamicLossScaleOptimizer).parameters.items()
    if name != "inner_optimizer" and parameter.kind is not parameter.VAR_KEYWORD)


def check_keywords(function: Callable[..., Any], scale_args: Mapping[str, Any]) -> None:
    """Refuses a keyword argument that neither `function` nor `DynamicLossScaleOptimizer`
    (to which `function` passes its `**scale_args`) takes, whatever the precision.

    Args:
        function: `tfmp.wrap_optimizer` or `tfmp.prepare`, for the message.
        scale_args: The keywords its signature did not name.

    Raises:
        ValueError: one line naming the unknown keywords and their values (with the
            closest accepted name, if any) and every accepted one.
    """
    unknown = [key for key in scale_args if key not in SCALE_ARGS]
    if not unknown:
        return
    own = [name for name, parameter in inspect.signature(function).parameters.items()
           if parameter.kind is not parameter.VAR_KEYWORD]
    given = []
    for key in unknown:
        close = difflib.get_close_matches(key, own + list(SCALE_ARGS), n=1)
        value = " ".join(reprlib.repr(scale_args[key]).split())  # an array: short, one line
        given.append(f"{key}={value}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ValueError(
        f"tfmp.{function.__name__}() got keyword arguments no precision takes: "
        f"{', '.join(given)}; it takes {', '.join(own)} and DynamicLossScaleOptimizer's "
        f"{', '.join(SCALE_ARGS)}.")


def parse_loss_scale(loss_scale: LossScale) -> Optional[float]:
    """`"dynamic"` -> None; a positive number (or its string) -> that float.

    Args:
        loss_scale: `"dynamic"` (any case) or a positive finite number.

    Returns:
        None for a dynamic scale, else the fixed scale.

    Raises:
        ValueError: anything else; the message names the value.
    """
    if isinstance(loss_scale, str) and loss_scale.strip().lower() == "dynamic":
        return None
    try:
        value = float(loss_scale)
        ok = not isinstance(loss_scale, bool) and math.isfinite(value) and value > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"loss_scale={loss_scale!r} is not accepted; use 'dynamic' or a positive number."
        )
    return value


def wrap_optimizer(
    optimizer: Union[str, keras.optimizers.Optimizer],
    policy: Optional[str] = None,
    *,
    loss_scale: LossScale = "dynamic",
    guard: bool = False,
    weights_dtype: Optional[str] = None,
    **scale_args: Any,
) -> keras.optimizers.Optimizer:
    """Wraps an optimizer in the loss scaling its precision policy needs.

    Args:
        optimizer: A Keras optimizer or its name (`"adam"`).
        policy: Precision name (aliases and `auto` accepted); defaults to Keras'
            current global policy.
        loss_scale: `"dynamic"`, or a positive number for a fixed scale.
            Only used under mixed_float16.
        guard: Under bfloat16/float32, wrap anyway with a fixed scale of 1 so
            that steps with non-finite gradients are skipped and counted
            instead of writing NaN into the weights. An optimizer's own
            `loss_scale_factor` becomes the fixed scale wherever it is wrapped
            (Keras' LossScaleOptimizer would drop it).
        weights_dtype: None (default: float32 weights), or the 16-bit dtype the model's
            weights are stored in, the policy's compute dtype (`"bfloat16"` under
            mixed_bfloat16, `"float16"` under mixed_float16): the optimizer (the inner one
            under loss scaling) is made to keep their small updates, `tfmp.compensate`
            with its default rounding for bfloat16 and `rounding="kahan"` for float16
            (one compensated already is kept). `tfmp.prepare(..., weights_dtype=...)`
            stores the weights so.
        **scale_args: Passed to `DynamicLossScaleOptimizer` (`initial_scale`,
            `growth_interval`, `min_scale`, `hysteresis`, ...: `SCALE_ARGS`). Where no
            loss-scale optimizer is made (bfloat16 / float32 without `guard`) they are
            ignored, with one warning; a keyword that is none of them is refused
            under every precision.

    Returns:
        A `DynamicLossScaleOptimizer` under mixed_float16 (or with `guard=True`),
        else `optimizer` itself. Idempotent: a `DynamicLossScaleOptimizer` is
        returned as it is when it matches the request; a stock, unbuilt Keras
        `LossScaleOptimizer` is converted.

    Raises:
        ValueError: bad `policy`, `loss_scale` or scale arguments, an unknown keyword
            argument (`check_keywords`), a `loss_scale`
            that disagrees with the optimizer's `loss_scale_factor`, a stock
            LossScaleOptimizer that was already used (its state would be lost),
            or a `DynamicLossScaleOptimizer` that does not match the request
            (another policy's scaling, another fixed scale, other scale arguments);
            a `weights_dtype` that is not the policy's 16-bit compute dtype, or an
            optimizer `tfmp.compensate` refuses (built already, rounding `"nearest"`).

    Example:
    >>> opt = tfmp.wrap_optimizer(keras.optimizers.Adam(1e-3), "fp16", min_scale=8.0)
    >>> tfmp.wrap_optimizer(opt) is opt
    True
    """
    check_keywords(wrap_optimizer, scale_args)
    fixed = parse_loss_scale(loss_scale)
    name = _policy_name(policy)
    weights = checked_weights_dtype(weights_dtype, name)
    if isinstance(optimizer, DynamicLossScaleOptimizer):
        _check_matches(optimizer, name if policy is not None else None, fixed, scale_args)
        return compensated_for(optimizer, weights) if weights else optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        if optimizer.built:
            raise ValueError(
                "Cannot convert a keras.optimizers.LossScaleOptimizer that has already "
                "been built (its scale would be lost); pass its inner_optimizer instead."
            )
        scale_args.setdefault("initial_scale", optimizer.initial_scale)
        scale_args.setdefault("growth_interval", optimizer.dynamic_growth_steps)
        optimizer = optimizer.inner_optimizer
    optimizer = keras.optimizers.get(optimizer)
    factor = optimizer.loss_scale_factor
    # Keras' LossScaleOptimizer turns the inner optimizer's factor off (the loss would
    # be scaled twice), silently: a fixed factor is a fixed loss scale.
    if (factor is not None and name == MIXED_FLOAT16 and fixed is not None
            and fixed != factor):
        raise ValueError(f"loss_scale={loss_scale!r} and the optimizer's loss_scale_factor="
                         f"{factor!r} disagree; give one of them.")
    undo = class_restorer(optimizer)
    if weights:
        optimizer = compensated_for(optimizer, weights)
    try:  # DynamicLossScaleOptimizer checks the scale arguments: on refusal, nothing changed
        return _wrapped(optimizer, name, fixed, factor, loss_scale, guard, scale_args)
    except BaseException:
        undo()
        raise


def _wrapped(optimizer: keras.optimizers.Optimizer, name: str, fixed: Optional[float],
             factor: Optional[float], loss_scale: LossScale, guard: bool,
             scale_args: dict[str, Any]) -> keras.optimizers.Optimizer:
    """`wrap_optimizer` once every argument is checked and the optimizer compensated."""
    if factor is not None and (name == MIXED_FLOAT16 or guard):
        optimizer.loss_scale_factor = None

    if name == MIXED_FLOAT16:
        fixed = float(factor) if fixed is None and factor is not None else fixed
        if fixed is not None:
            scale_args.update(initial_scale=fixed, min_scale=fixed, max_scale=fixed, dynamic=False)
        return DynamicLossScaleOptimizer(optimizer, **scale_args)
    if fixed is not None:
        logging.warning(
            "tfmp: loss_scale=%s ignored: %s does not need loss scaling.", loss_scale, name
        )
    if guard:
        scale = 1.0 if factor is None else float(factor)
        scale_args.update(initial_scale=scale, min_scale=scale, max_scale=scale, dynamic=False)
        return DynamicLossScaleOptimizer(optimizer, **scale_args)
    if scale_args:
        logging.warning(
            "tfmp: %s ignored: %s uses no loss scaling (pass guard=True for the NaN guard).",
            ", ".join(sorted(scale_args)), name,
        )
    return optimizer


def _policy_name(policy: Optional[str]) -> str:
    """The canonical policy asked for; Keras' global one (any, even float64) if None."""
    if policy is None:
        compute = keras.config.dtype_policy().compute_dtype
        return {"float16": MIXED_FLOAT16, "bfloat16": MIXED_BFLOAT16}.get(compute, compute)
    name = parse_precision(policy)
    return resolve_policy(name).name if name == "auto" else name


def _check_matches(optimizer: DynamicLossScaleOptimizer, policy: Optional[str],
                   fixed: Optional[float], scale_args: dict[str, Any]) -> None:
    """Raises if an existing `DynamicLossScaleOptimizer` is not what the call asks for.

    `policy` is the canonical policy the call named (None if it named none).
    """
    conflicts = []
    if policy is not None and policy != MIXED_FLOAT16 and optimizer.dynamic:
        conflicts.append(f"policy {policy!r} needs no loss scaling, but the optimizer scales "
                         f"dynamically from {optimizer.initial_scale:g}")
    if fixed is not None and (optimizer.dynamic or optimizer.initial_scale != fixed):
        conflicts.append(f"loss_scale={fixed:g} asks for a fixed scale, but the optimizer has "
                         f"{'a dynamic' if optimizer.dynamic else 'a fixed'} scale "
                         f"{optimizer.initial_scale:g}")
    config = optimizer.get_config()
    config["growth_interval"] = optimizer.growth_interval
    for key, value in sorted(scale_args.items()):  # SCALE_ARGS, each in the config
        if config[key] != value:
            conflicts.append(f"{key}={value!r} but the optimizer has {key}={config[key]!r}")
    if conflicts:
        raise ValueError(
            "wrap_optimizer: the DynamicLossScaleOptimizer given does not match the request: "
            + "; ".join(conflicts) + ". Pass its inner_optimizer to wrap it anew."
        )


def get_unscaled_gradients(
    optimizer: keras.optimizers.Optimizer, grads: Sequence[Any]
) -> list[Any]:
    """Divides gradients of `optimizer.scale_loss(loss)` by the current scale.

    For custom loops that clip by hand (TF2's `get_unscaled_gradients`). Apply
    the result with `optimizer.apply_unscaled(grads, variables)` on a
    `DynamicLossScaleOptimizer` (plain `apply` would unscale a second time);
    for an optimizer without loss scaling the gradients come back unchanged
    and `apply` is right.

    Args:
        optimizer: The optimizer whose `scale_loss` scaled the loss.
        grads: Gradients of the scaled loss (None entries stay None).

    Returns:
        The gradients divided by the scale.

    Example:
    >>> with tf.GradientTape() as tape:
    ...     loss = loss_fn(y, model(x, training=True))
    ...     scaled = opt.scale_loss(loss)
    >>> grads = tfmp.get_unscaled_gradients(opt, tape.gradient(scaled, model.trainable_variables))
    >>> grads, _ = tf.clip_by_global_norm(grads, 1.0)   # clips the true gradients
    >>> opt.apply_unscaled(grads, model.trainable_variables)
    """
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return list(grads)
    if isinstance(optimizer, DynamicLossScaleOptimizer):  # its scale may exist before `built`
        scale = optimizer.current_scale()
    else:
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    return [None if g is None else g / keras.ops.cast(scale, g.dtype) for g in grads]
