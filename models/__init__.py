"""Reference models: plain `build(...) -> keras.Model` functions, mixed-precision
correct by construction (float32 outputs and norms), looked up by flag value."""

from typing import Callable

import keras

from models import cnn, mlp, transformer

_MODULES = {"mlp": mlp, "cnn": cnn, "transformer": transformer}
# Flag value -> (builder, kind of input it takes: "vector", "image" or "tokens").
REGISTRY: dict[str, tuple[Callable[..., keras.Model], str]] = {
    name: (module.build, module.INPUT_KIND) for name, module in _MODULES.items()}
SIZES = ("default", "large")


def size_kwargs(name: str, size: str) -> dict:
    """Builder arguments of a model at a size: `default` (none) or `large` (its `LARGE`)."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; accepted: {', '.join(SIZES)}.")
    get(name)
    return dict(_MODULES[name].LARGE) if size == "large" else {}


def get(name: str) -> tuple[Callable[..., keras.Model], str]:
    """`(build, input_kind)` for a model name; `ValueError` lists the names."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown model {name!r}; accepted: {', '.join(REGISTRY)}.")
    return REGISTRY[name]
