"""Changing what a model computes in, in place: every layer takes a new dtype policy.

The rebuild of `tfmp.rewrite.cloning` re-creates every layer from its config,
which only Keras' own Sequential and Functional classes allow (a Functional
subclass, such as a keras-hub task holding its backbone, comes back as a plain
Functional model without its methods; a layer whose config does not round-trip
cannot be re-created at all). Every other model is converted here, in place:
Keras layers take a new `dtype_policy` after construction, and under every mixed
policy variables stay float32, so no weight is touched. The model's outputs are
made float32 by the layers that produce them (found by running the model) and,
where an op of the model's own `call` produces one, by a cast at the end of its
`call` (on this instance).

What a saved in-place model keeps is up to its class: Keras rebuilds it through
its own constructor when loading (a keras-hub model from its config, which holds
its dtype; a subclassed model under the global policy at load time), so convert
it again after loading.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import keras
from keras import ops

from tfmp import _compat
from tfmp._messages import first_line
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.classify import iter_layers
from tfmp.rewrite.tracing import MODEL_PATH, ModelRun, run_model

_FLOAT32_OUTPUTS = "_tfmp_float32_outputs"
_CALL_BEFORE_CAST = "_tfmp_call_before_cast"


def is_copyable(model: keras.Model) -> bool:
    """True when Keras can rebuild `model` layer by layer: it and every model nested in it
    are of Keras' own `Sequential` or `Functional` class (not subclasses).

    Args:
        model: A Keras model.

    Returns:
        Whether `tfmp.rewrite.cloning.clone_with_dtypes` can copy it.
    """
    plain = (keras.Sequential, _compat.functional_class())
    nested = [layer for _, layer in iter_layers(model) if isinstance(layer, keras.Model)]
    return all(type(m) in plain for m in [model, *nested])


def _float32(x: Any) -> Any:
    dtype = keras.backend.standardize_dtype(getattr(x, "dtype", "int32"))
    return ops.cast(x, "float32") if dtype in HALF_DTYPES else x


def cast_outputs_to_float32(model: keras.Model) -> bool:
    """Makes this model's `call` end by casting its 16-bit outputs to float32.

    Set on the instance (idempotent); Keras' saving does not record it.

    Args:
        model: A Keras model.

    Returns:
        True when the cast was added now, False when it was already there.
    """
    if vars(model).get(_FLOAT32_OUTPUTS):
        return False
    call = model.call
    vars(model)[_CALL_BEFORE_CAST] = vars(model).get("call")  # an instance call of its own

    @functools.wraps(call)
    def call_with_float32_outputs(*args: Any, **kwargs: Any) -> Any:
        return keras.tree.map_structure(_float32, call(*args, **kwargs))

    _compat.set_instance_call(model, call_with_float32_outputs)
    vars(model)[_FLOAT32_OUTPUTS] = True
    return True


def policies_of(model: keras.Model) -> dict[Any, Any]:
    """Every layer's dtype policy (nested models and `model` itself), by `id()`, for
    `restore_policies`.

    Args:
        model: A Keras model.

    Returns:
        `{id(layer): policy}`, and whether the float32 output cast was there.
    """
    saved: dict[Any, Any] = {
        id(layer): layer.dtype_policy
        for layer in _compat.flatten_layers(model, include_self=True, recursive=True)}
    saved[_FLOAT32_OUTPUTS] = bool(vars(model).get(_FLOAT32_OUTPUTS))
    return saved


def restore_policies(model: keras.Model, saved: dict[Any, Any]) -> None:
    """Gives every layer back the policy `policies_of` saved, and drops the float32 output
    cast if one was added since.

    Args:
        model: The model `saved` was taken from.
        saved: What `policies_of(model)` returned.
    """
    set_policies(model, lambda layer: saved.get(id(layer)))
    if not saved.get(_FLOAT32_OUTPUTS) and vars(model).pop(_FLOAT32_OUTPUTS, False):
        own = vars(model).pop(_CALL_BEFORE_CAST, None)
        if own is None:
            _compat.remove_instance_call(model)
        else:
            _compat.set_instance_call(model, own)


def set_policies(model: keras.Model,
                 dtype_for: Callable[[keras.layers.Layer], Optional[Any]]) -> list[str]:
    """Gives every layer of `model` (nested models and `model` itself included) the
    policy `dtype_for(layer)` (None: unchanged), in place.

    Traced train, test and predict functions are dropped, so the next call traces anew.

    Args:
        model: A built Keras model.
        dtype_for: The policy name for each layer, or None to keep its own.

    Returns:
        One `"path: old -> new"` entry per changed layer.
    """
    paths = {id(layer): path for path, layer in iter_layers(model)}
    changed = []
    for layer in _compat.flatten_layers(model, include_self=True, recursive=True):
        dtype = dtype_for(layer)
        name = getattr(dtype, "name", dtype)
        if dtype is not None and name != layer.dtype_policy.name:
            changed.append(f"{paths.get(id(layer), layer.name)}: {layer.dtype_policy.name} -> {name}")
            layer.dtype_policy = dtype
        if isinstance(layer, keras.Model):
            _compat.forget_traced_functions(layer)
    return changed


def model_level_layers(model: keras.Model) -> set[int]:
    """`id()`s of the layers that a model calls itself: the layers of `model`'s graph or
    `call` and of every model nested in it, and the models. Not the sublayers a custom
    layer makes and calls in its own code, which was written for one dtype.

    Args:
        model: A Keras model.

    Returns:
        The `id()`s.
    """
    models = [model] + [layer for _, layer in iter_layers(model) if isinstance(layer, keras.Model)]
    return {id(m) for m in models} | {
        id(layer) for m in models for layer in _compat.flatten_layers(m, recursive=False)}


def _output_layers(run: ModelRun, level: set[int]) -> set[int]:
    """`id()`s of the model-level layers (not models) whose ops made the model's outputs."""
    return {id(layer.layer) for layer in run.layers
            if layer.path in run.output_producers and id(layer.layer) in level
            and not isinstance(layer.layer, keras.Model)}


def convert_in_place(
    model: keras.Model,
    dtype_for: Callable[[keras.layers.Layer], Optional[str]],
    float32: Callable[[keras.layers.Layer], bool] = lambda layer: False,
    *,
    outputs: bool = True,
    data: Any = None,
) -> tuple[list[str], ModelRun]:
    """Gives each layer `dtype_for(layer)` in place, the layers `float32` selects float32,
    and, with `outputs`, makes the model's outputs float32.

    Float32 is given only to the layers the model calls itself (`model_level_layers`):
    those `float32` selects and, with `outputs`, those whose ops produce the outputs
    (found by running the model). If the model then fails to run (its code adds a
    float32 tensor to a 16-bit one without a cast, as a post-norm residual does), those
    choices are dropped: every layer takes `dtype_for` alone. Either way a 16-bit output
    is cast to float32 at the end of the model's `call`. Whatever goes wrong, the model
    is given back as it came.

    Args:
        model: A built Keras model of any kind.
        dtype_for: The policy name for each layer, or None to keep its own.
        float32: The layers to compute in float32 where the model's code allows it.
        outputs: Make every output float32.
        data: A batch to run the model on (`tfmp.rewrite.tracing.example_inputs`); default: its
            input shapes.

    Returns:
        `(changes, run)`: one entry per change, and the `ModelRun` of the converted model.

    Raises:
        ValueError: the model is not built, cannot be run, or cannot be run once converted.
    """
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built; call it on data or give it an Input "
                         "first.")
    before = policies_of(model)
    try:
        run = _run(model, "before converting it", data)
        level = model_level_layers(model)
        heads = _output_layers(run, level) if outputs else set()

        def full(layer: keras.layers.Layer) -> Optional[str]:
            if id(layer) in level and (id(layer) in heads or float32(layer)):
                return "float32"
            return dtype_for(layer)

        changes = set_policies(model, full)
        try:
            run = run_model(model, data)
        except Exception as e:  # noqa: BLE001 (its code fails on the mixed dtypes)
            restore_policies(model, before)
            changes = set_policies(model, dtype_for) + [
                f"{MODEL_PATH}: no layer made float32: the model fails with them "
                f"({first_line(e, typed=True)})"]
            run = _run(model, "once converted", data)
        if outputs and any(d in HALF_DTYPES for d in run.output_dtypes):
            cast_outputs_to_float32(model)
            changes.append(f"{MODEL_PATH}: outputs ({', '.join(run.output_dtypes)}) cast to float32")
            run = dataclasses.replace(run, output_dtypes=tuple(
                "float32" if d in HALF_DTYPES else d for d in run.output_dtypes))
    except BaseException:
        restore_policies(model, before)
        raise
    return changes, run



def _run(model: keras.Model, when: str, data: Any) -> ModelRun:
    try:
        return run_model(model, data)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (a model's own code raises anything when traced)
        raise ValueError(f"cannot run {model.name!r} ({type(model).__name__}) {when}: "
                         f"{first_line(e, typed=True)}") from None
