"""The loss `compare_precision` and `tune` train with: the one the model's output needs.

A given `loss=` wins; else the loss the model was compiled with; else sparse
categorical cross-entropy with `from_logits` following the output (False after a
softmax, True on logits), or binary cross-entropy after a sigmoid. The output is
read as `tfmp.audit` reads it: from the traced graph (the op that computed each
output, through casts and reshapes), or, for a model that cannot be traced, from
its output layers' configs. A given or compiled loss whose `from_logits` contradicts
the output is used, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Optional

import keras

from tfmp import layers as tfmp_layers
from tfmp._messages import first_line, warn
from tfmp.rewrite import run_model
from tfmp.rewrite.classify import output_layers
from tfmp.rewrite.tracing import split_batch

PROBABILITY_OPS = {"Softmax": "softmax", "Sigmoid": "sigmoid"}  # op type -> activation


@dataclasses.dataclass(frozen=True)
class ChosenLoss:
    """The loss to train with, and why.

    Attributes:
        fn: A Keras `Loss` (a loss function is averaged over the batch, as `compile` does).
        description: `"<loss>: <why>"`, e.g. `"SparseCategoricalCrossentropy(from_logits=False):
            probabilities output (softmax in 'dense_1')"`.
    """

    fn: keras.losses.Loss
    description: str


class _Averaged(keras.losses.Loss):
    """A loss function's per-example values averaged over the batch, as `compile` does."""

    def __init__(self, fn: Any) -> None:
        self.label = getattr(fn, "__name__", type(fn).__name__)  # `<lambda>` too
        super().__init__(name=re.sub(r"\W", "_", self.label).strip("_") or "loss")  # a scope
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _as_loss(loss: Any) -> keras.losses.Loss:
    fn = keras.losses.get(loss) if isinstance(loss, (str, dict)) else loss
    if not callable(fn):
        raise ValueError(f"loss={loss!r} is not a loss: give a Keras loss name, a "
                         "keras.losses.Loss or a function of (y_true, y_pred)")
    return fn if isinstance(fn, keras.losses.Loss) else _Averaged(fn)


def _from_logits(loss: keras.losses.Loss) -> Optional[bool]:
    """The loss's `from_logits` (a function's default), None when it has none."""
    if not isinstance(loss, _Averaged):
        value = loss.get_config().get("from_logits")
        return None if value is None else bool(value)
    try:
        param = inspect.signature(loss.fn).parameters.get("from_logits")
    except (TypeError, ValueError):  # a callable without a signature
        return None
    return None if param is None or param.default is param.empty else bool(param.default)


def _name(loss: keras.losses.Loss) -> str:
    name = loss.label if isinstance(loss, _Averaged) else type(loss).__name__
    from_logits = _from_logits(loss)
    return name if from_logits is None else f"{name}(from_logits={from_logits})"


def _activation(layer: keras.layers.Layer) -> Optional[str]:
    """`softmax` or `sigmoid` when the layer's config says it ends in one, else None."""
    if isinstance(layer, (keras.layers.Softmax, tfmp_layers.StableSoftmax)):
        return "softmax"
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    return name if name in ("softmax", "sigmoid") else None


Outputs = tuple[tuple[str, Optional[str]], ...]  # (where each is made, its activation or None)


def read_outputs(model: keras.Model, data: Any) -> tuple[Outputs, str]:
    """What each output of `model` is: `(where it is made, "softmax" | "sigmoid" | None)`,
    None meaning logits.

    Args:
        model: A built Keras model of any kind.
        data: A batch to trace it on (`(x, y)` or inputs).

    Returns:
        `(outputs, error)`: the outputs as read from the traced graph, or from the output
        layers' configs when the model cannot be traced (`error` then says why); no
        outputs when neither can be read (a subclassed model that cannot be traced).
    """
    try:
        run = run_model(model, data)
    except Exception as e:  # noqa: BLE001 (a model's own code raises anything when traced)
        error = f"{first_line(e, typed=True)}"
    else:
        return tuple((path, PROBABILITY_OPS.get(op)) for op, path in run.output_sources), ""
    return tuple((layer.name, _activation(layer)) for layer in output_layers(model)), error


def _checked(loss: keras.losses.Loss, why: str, outputs: Outputs) -> ChosenLoss:
    """`loss` as it is, with a warning when its `from_logits` contradicts the output."""
    from_logits, note = _from_logits(loss), ""
    probabilities = [(path, act) for path, act in outputs if act]
    if from_logits and probabilities:
        note = (f"; from_logits=True, but the output is probabilities "
                f"({probabilities[0][1]} in {probabilities[0][0]!r})")
    elif from_logits is False and outputs and not probabilities:
        note = (f"; from_logits=False, but the output is logits ({outputs[0][0]!r} applies no "
                "softmax or sigmoid)")
    description = f"{_name(loss)}: {why}{note}"
    if note:  # at the line that called compare_precision / tune
        warn(f"tfmp: the loss {description}", stacklevel=4)
    return ChosenLoss(loss, description)


def _units(model: keras.Model, data: Any) -> Optional[int]:
    """The size of the model's output's last axis on `data` (None: it cannot be run)."""
    try:
        x, _ = split_batch(model, data)
        return int(keras.tree.flatten(model(x, training=False))[0].shape[-1])
    except Exception:  # noqa: BLE001 (read_outputs said why already, where it matters)
        return None


def choose_loss(model: keras.Model, loss: Any, data: Any) -> ChosenLoss:
    """The loss to train `model` with: `loss`, else its compiled loss, else one for its output.

    Args:
        model: The model as `build_model` returned it (float32, before `tfmp.prepare`).
        loss: The `loss=` given (a Keras loss name, a `keras.losses.Loss`, a function of
            `(y_true, y_pred)`), or None.
        data: A batch to read the model's outputs on.

    Returns:
        A `ChosenLoss`: the loss and `"<loss>: <why>"`.

    Raises:
        ValueError: `loss` is not a loss; or, with no loss given, the model has several
            outputs (or was compiled with a loss per output).
    """
    outputs, error = read_outputs(model, data)
    if loss is not None:  # a function of (y_true, y_pred) for the whole output, any structure
        return _checked(_as_loss(loss), "given (loss=)", outputs)
    if len(outputs) > 1:
        raise ValueError(f"the model has {len(outputs)} outputs ({', '.join(p for p, _ in outputs)})"
                         ": give loss= a function of (y_true, y_pred) for all of them")
    compiled = getattr(model, "loss", None)  # what `compile(loss=...)` was given
    if isinstance(compiled, (dict, list, tuple)):
        shown = dict(compiled) if isinstance(compiled, dict) else list(compiled)
        raise ValueError(f"the model was compiled with a loss per output ({shown!r}): give "
                         "loss= a function of (y_true, y_pred) for the whole output")
    if compiled is not None:
        return _checked(_as_loss(compiled), "the model's compiled loss", outputs)
    if not outputs:
        fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        description = (f"{_name(fn)}: assumed, the output could not be read ({error}); "
                       "give loss= to be sure")
        warn(f"tfmp: the loss {description}", stacklevel=3)
        return ChosenLoss(fn, description)
    path, act = outputs[0]
    if act is None and _units(model, data) == 1:
        fn = keras.losses.BinaryCrossentropy(from_logits=True)
        why = (f"one logit ({path!r} has one unit and no sigmoid: binary classification; "
               "give loss= for a regression)")
    elif act is None:
        fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        why = f"logits output ({path!r} applies no softmax or sigmoid)"
    else:
        fn = (keras.losses.BinaryCrossentropy if act == "sigmoid"
              else keras.losses.SparseCategoricalCrossentropy)(from_logits=False)
        why = f"probabilities output ({act} in {path!r})"
    return ChosenLoss(fn, f"{_name(fn)}: {why}")
