"""`tfmp.rewrite.convert_policy`: a model made to compute under another dtype policy."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import keras
from absl import logging

from tfmp.precision import resolve_policy
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.classify import is_normalization, iter_layers, model_policy
from tfmp.rewrite.cloning import policy_rule
from tfmp.rewrite.enforcement import (LayerSpec, convert, float32_selector, layer_matcher,
                                      normalizations_feeding)
from tfmp.rewrite.inplace import model_level_layers, policies_of, restore_policies
from tfmp.rewrite.tracing import ModelRun, run_model


def _check_computes_in(model: keras.Model, run: Optional[ModelRun], policy: str) -> None:
    """Raises when a model converted to a 16-bit policy ran every matmul and convolution in
    float32 anyway (its own code casts to float32)."""
    half = keras.dtype_policies.get(policy).compute_dtype
    if run is None or half not in HALF_DTYPES or not run.flops() or run.flops((half,)):
        return
    stuck = [layer.path for layer in run.layers if layer.flops() and layer.policy == policy]
    if stuck:
        raise ValueError(
            f"{model.name!r} ({type(model).__name__}) under {policy} still computes every matmul "
            f"and convolution in float32: {', '.join(stuck[:5])}{' ...' if len(stuck) > 5 else ''} "
            f"run theirs in float32 although their policy is {policy} (does their code cast to "
            "float32?); give those layers 16-bit computations or keep the model in float32")


def _normalizations_with_half_statistics(model: keras.Model, run: Optional[ModelRun], policy: str,
                                        data: Any) -> tuple[set[str], Optional[ModelRun]]:
    """Paths of the normalization layers that, under a 16-bit `policy`, take the square root
    of a sum in 16 bits (as the audit sees it: by what they run, not by their class); and
    the trace of `model` made here to find them (None when `run` was given or none was
    needed)."""
    # Only the layers a conversion can change (not the sublayers a custom layer calls itself).
    changeable = model_level_layers(model)
    candidates = {path for path, layer in iter_layers(model) if id(layer) in changeable
                  and is_normalization(layer) and layer.compute_dtype in HALF_DTYPES}
    if not candidates or keras.dtype_policies.get(policy).compute_dtype not in HALF_DTYPES:
        return set(), None
    fresh = run_model(model, data) if run is None else None
    return {layer.path for layer in (run if run is not None else fresh).layers
            if layer.path in candidates and layer.half_statistics()}, fresh


def _check_kept(model: keras.Model, float32_layers: Iterable[LayerSpec]) -> None:
    """Raises when a layer `float32_layers` names still computes in 16 bits after conversion."""
    specs = list(float32_layers)
    if not specs:
        return
    kept = layer_matcher(model, specs)
    stuck = [path for path, layer in iter_layers(model)
             if kept(layer) and layer.compute_dtype != "float32"]
    if stuck:
        raise ValueError(
            f"float32_layers: {', '.join(stuck[:3])}{' ...' if len(stuck) > 3 else ''} could not "
            "be made float32 (a sublayer of a custom layer in a model converted in place, or one "
            "its code fails with): keep the enclosing layer in float32, or cast in its code")


def convert_policy(model: keras.Model, policy: str, *, data: Any = None,
                   float32_layers: Iterable[LayerSpec] = ()) -> keras.Model:
    """`model` made to compute under another dtype policy, weights kept bit for bit.

    Outputs and softmax layers (and tfmp's float32 layers) stay in float32; every
    other layer built under the model's policy takes `policy`; layers given
    another dtype on purpose keep it. Normalization layers take `policy` (their
    outputs are 16-bit tensors, half the activation memory) when their own code
    computes the statistics in float32, as Keras' BatchNormalization,
    LayerNormalization, GroupNormalization and RMSNormalization do: decided by
    tracing what they run under `policy`; a normalization layer that would take
    the root of a sum in 16 bits, or (in a Sequential or Functional graph, not
    across a nested model's inputs) whose output goes straight into a float32
    output layer or softmax, computes in float32. Variables are float32 under
    every policy, so round trips (float32 -> mixed_bfloat16 -> mixed_float16 ->
    float32) leave the weights bit-identical. Keras' global policy is not touched.
    `tfmp.prepare` converts through this.

    Copied or converted in place: a Sequential or Functional model of Keras' own
    classes (nested ones too) is rebuilt as a new model and the input model is
    not changed. Every other model (a subclassed model, a Functional subclass
    such as a keras-hub task, a model holding a layer whose config does not
    re-create it) is converted in place and returned itself: each layer takes
    its new dtype policy, the layers that produce its outputs compute in float32
    (found by running it), and an output its own `call` makes in 16 bits is cast
    to float32. Such a model is checked by running it: one that still computes
    every matmul in float32 under a 16-bit policy raises.

    Args:
        model: A built Keras model of any kind.
        policy: `float32`, `mixed_float16` or `mixed_bfloat16` (any spelling
            `tfmp.set_policy` accepts; `auto` resolves from the hardware).
        data: A batch to run a model converted in place on (`tfmp.rewrite.tracing.example_inputs`:
            an array, a structure, `(x, y)` or a dataset); needed for a subclassed model
            that takes integer ids or inputs other than those it was built from;
            default: its input shapes.
        float32_layers: More layers to compute in float32: names, paths (`block/dense`)
            or classes (`tfmp.locate_overflows(...).paths`).

    Returns:
        A new model, or `model` itself converted in place (see above).

    Raises:
        ValueError: a bad policy name; an unbuilt model; a `float32_layers` entry that
            names no layer, or a layer it names that could not be made float32 (a sublayer
            of a custom layer in a model converted in place); a model converted in place
            whose code keeps every matmul in float32 under a 16-bit policy.

    Example:
    >>> f32 = tfmp.convert_policy(keras.models.load_model("mixed.keras"), "float32")
    """
    return convert_with_trace(model, policy, data=data, float32_layers=float32_layers)[0]


def convert_with_trace(model: keras.Model, policy: str, *, data: Any = None,
                       float32_layers: Iterable[LayerSpec] = ()
                       ) -> tuple[keras.Model, Optional[ModelRun]]:
    """`convert_policy`, and the trace of the converted model if the conversion made one.

    A copied model with 16-bit normalization layers is traced once, to see where their
    statistics are computed; that trace is of the model returned, as it is returned, and
    `tfmp.prepare` hands it to `tfmp.audit` (`run=`) instead of tracing the model again.

    Args:
        model, policy, data, float32_layers: As for `convert_policy`.

    Returns:
        `(converted model, its ModelRun or None)`: None when no trace of the model as
        returned was made (a model converted in place is traced before its outputs are
        cast; a model converted twice was traced before the second conversion).

    Raises:
        ValueError: As `convert_policy`.
    """
    target = resolve_policy(policy).name
    source = model_policy(model)
    if source != target:
        logging.info("tfmp: converting the %s model under %s", source, target)
    before = policies_of(model)
    rule = policy_rule(source, target, lambda layer: False)
    # Normalization layers take the policy too unless their output feeds a float32 layer;
    # those whose own code then computes the statistics in 16 bits go float32 (below).
    chosen = float32_selector(model, normalization=False)
    kept = layer_matcher(model, float32_layers)
    feeding = normalizations_feeding(model, lambda layer: chosen(layer) or kept(layer))

    def first(layer: keras.layers.Layer) -> bool:
        return chosen(layer) or kept(layer) or id(layer) in feeding

    converted, run = convert(model, rule, first, data=data)
    try:
        half_statistics, fresh = _normalizations_with_half_statistics(converted, run, target, data)
        if half_statistics:
            fresh = None  # of the model before this second conversion
            logging.info("tfmp: normalization statistics computed in 16 bits by %s: float32 "
                         "for those layers", ", ".join(sorted(half_statistics)))
            if converted is model:
                restore_policies(model, before)
            paths = {id(layer): path for path, layer in iter_layers(model)}
            converted, run = convert(
                model, rule, lambda layer: first(layer) or paths.get(id(layer)) in half_statistics,
                data=data)
        _check_computes_in(converted, run, target)
        _check_kept(converted, float32_layers)
    except BaseException:
        if converted is model:  # converted in place: give the model back as it came
            restore_policies(model, before)
        raise
    return converted, fresh
