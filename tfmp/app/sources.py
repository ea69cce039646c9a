"""What `--model` and `--data` name when they name the user's own code: `package.module:function`,
its keyword arguments (`--model_args`), and a `.keras` file.

Every failure is a `SourceError` in one line naming the flag and the value.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Optional

import keras

from tfmp._messages import first_line


class SourceError(ValueError):
    """A `--model`, `--model_args` or `--data` value that cannot be used; one line."""


def is_callable_spec(value: str) -> bool:
    """Whether a flag value names a function (`package.module:function`)."""
    module, sep, name = value.partition(":")
    return bool(sep) and bool(module) and name.isidentifier() and all(
        part.isidentifier() for part in module.split("."))


def import_callable(spec: str, flag: str) -> Callable[..., Any]:
    """The function `package.module:function` names.

    Args:
        spec: `package.module:function` (`is_callable_spec`).
        flag: The flag that gave it, for the message (`model`, `data`).

    Returns:
        The callable.

    Raises:
        SourceError: the module does not import (its own error's first line), or has no such
            callable.
    """
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (a module may raise anything on import)
        raise SourceError(f"--{flag}={spec}: cannot import {module_name!r} "
                          f"({first_line(e, typed=True)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        what = "is not callable" if hasattr(module, name) else "is not defined there"
        raise SourceError(f"--{flag}={spec}: {name!r} {what}; give package.module:function")
    return fn


def parse_model_args(text: Optional[str]) -> dict[str, Any]:
    """`--model_args`: a JSON object, or `key=value,...` (values read as Python literals:
    numbers, True/False/None, quoted strings, lists; anything else is a string).

    Args:
        text: The flag's value, or None.

    Returns:
        The keyword arguments.

    Raises:
        SourceError: not a JSON object nor `key=value` pairs with identifier keys.
    """
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            args = json.loads(text)
        except ValueError as e:
            raise SourceError(f"--model_args={text}: not valid JSON ({first_line(e)})") from None
        if not all(isinstance(k, str) and k.isidentifier() for k in args):
            raise SourceError(f"--model_args={text}: keys must be argument names")
        return args
    args = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SourceError(f"--model_args={text}: {item.strip()!r} is not key=value; give "
                              "key=value,... or a JSON object")
        args[key] = _literal(value.strip())
    return args


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets and quotes (`sizes=[64, 32],name='a,b'`)."""
    items, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(value.lower(), value)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """How to make the run's model: each call of `build` returns a new one (tune and the
    float32 replay build more than one).

    Attributes:
        name: What `--model` said (a reference name, `package.module:function`, a path).
        build: `build(data_kwargs)`: the model. A reference model takes the data's shape and
            classes (`Data.model_kwargs`), overridden by `--model_args`; a user's function
            takes `--model_args` alone; a `.keras` file is loaded again.
        input_kind: `vector`, `image` or `tokens` for a reference model (what synthetic data
            it trains on); None for the user's model (read from the model once built).
        reference: Whether it is one of tfmp's reference models (compiled by the job with
            sparse categorical cross-entropy on logits and accuracy).
    """

    name: str
    build: Callable[[dict[str, Any]], keras.Model]
    input_kind: Optional[str]
    reference: bool


def from_function(spec: str, model_args: dict[str, Any]) -> ModelSource:
    """A `ModelSource` calling `package.module:function(**model_args)`.

    Raises:
        SourceError: see `import_callable`.
    """
    fn = import_callable(spec, "model")
    return from_callable(lambda: fn(**model_args), spec, model_args)


def from_callable(fn: Callable[[], Any], name: str, model_args: Optional[dict[str, Any]] = None,
                  label: Optional[str] = None) -> ModelSource:
    """A `ModelSource` calling `fn()`, which must return a Keras model.

    Args:
        fn: Builds the model.
        name: What it is called in the summary.
        model_args: The arguments `fn` passes on, for the message when they do not fit.
        label: What messages call it (default `--model=<name>`).

    Returns:
        The `ModelSource` (its `build` raises `SourceError` if `fn` fails or returns no
        model: `built`).
    """
    label = label or f"--model={name}"
    return ModelSource(name, lambda _: built(fn, label, model_args), None, False)


def built(fn: Callable[[], Any], label: str, model_args: Optional[dict[str, Any]] = None,
          ) -> keras.Model:
    """`fn()`, which must return a Keras model.

    Args:
        fn: Builds the model.
        label: What messages call it (`--model=...`).
        model_args: The arguments it passes on (named in the message when it fails).

    Returns:
        The model.

    Raises:
        SourceError: it raises (its error's first line) or returns something else.
    """
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 (the user's code may raise anything)
        given = f" with --model_args {model_args}" if model_args else ""
        raise SourceError(f"{label}{given} failed: {type(e).__name__}: "
                          f"{first_line(e)}") from None
    if not isinstance(model, keras.Model):
        raise SourceError(f"{label} returned a {type(model).__name__}, not a Keras model")
    return model


def from_file(path: str, model_args: dict[str, Any]) -> ModelSource:
    """A `ModelSource` loading a `.keras` file with `safe_mode` (no code from the file runs).

    Raises:
        SourceError: missing or unreadable file, or `--model_args` given (a file takes none).
    """
    if model_args:
        raise SourceError(f"--model_args is for a function or a reference model; --model={path} "
                          "is a saved model and takes none")
    check_file(path, "model")
    return ModelSource(path, lambda _: load_file(path, "model"), None, False)


def check_file(path: str, flag: str) -> None:
    """Raises `SourceError` naming `--<flag>=path` when it is missing or unreadable."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        what = "does not exist" if not os.path.exists(path) else "is not a readable file"
        raise SourceError(f"--{flag}={path!r} {what}")


def load_file(path: str, flag: str) -> keras.Model:
    """A `.keras` file loaded in safe mode (no code from the file runs).

    Args:
        path: The file.
        flag: The flag that named it (`model`, `model_path`), for the message.

    Returns:
        The model.

    Raises:
        SourceError: not a loadable `.keras` model, in one line (a custom class: name its
            module with `--import_modules`; code in the file: safe mode does not run it).
    """
    check_file(path, flag)
    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as e:  # noqa: BLE001 (Keras raises many kinds)
        text = str(e)
        hint = ""
        if "safe_mode" in text or "lambda" in text.lower():
            hint = (" (it holds code, which safe mode does not run: rebuild the layer as a "
                    "registered class, or give the function that builds the model)")
        elif "register_keras_serializable" in text or "Could not locate" in text:
            hint = " (a custom class: name its module with --import_modules)"
        reason = first_line(e).split(" Make sure custom classes")[0]  # not Keras' whole config
        raise SourceError(f"--{flag}={path!r} is not a loadable .keras model "
                          f"({type(e).__name__}: {reason}){hint}") from None


References = dict[str, tuple[Callable[..., keras.Model], str]]


def resolve_model(value: str, model_args: dict[str, Any], references: References) -> ModelSource:
    """What `--model` names: a reference model, `package.module:function`, or a `.keras` file.

    Args:
        value: The flag's value.
        model_args: `--model_args`, parsed.
        references: Reference names -> `(build, input_kind)` (tools/train: `models.REGISTRY`).

    Returns:
        The `ModelSource`.

    Raises:
        SourceError: none of the three, or see `from_function` and `from_file`.
    """
    if value in references:
        builder, kind = references[value]
        return ModelSource(value, lambda kwargs: built(lambda: builder(**{**kwargs, **model_args}),
                                                       f"--model={value}", model_args), kind, True)
    if value.endswith(".keras"):
        return from_file(value, model_args)
    if is_callable_spec(value):
        return from_function(value, model_args)
    names = ", ".join(references)
    raise SourceError(f"--model={value!r} is not accepted: give {names + ', ' if names else ''}"
                      "package.module:function (returning a Keras model) or a .keras file")


def run_modules(flags: dict[str, Any]) -> list[str]:
    """The modules a run's `model.keras` needs imported (its custom classes): the run's
    `--import_modules` and the module of its `--model` function (`summary.json`'s flags).

    Args:
        flags: The run's flags (`summary.json`'s `"flags"`), or {}.

    Returns:
        Dotted module names.
    """
    modules = list(flags.get("import_modules") or ())
    model = flags.get("model")
    if isinstance(model, str) and is_callable_spec(model):
        modules.append(model.partition(":")[0])
    return modules
