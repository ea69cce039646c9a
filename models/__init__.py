"""Reference models: plain `build(...) -> keras.Model` functions, mixed-precision
correct by construction (float32 outputs and norms), looked up by flag value."""

from typing import Callable

import keras

from models import cnn, mlp, transformer

# Flag value -> (builder, kind of input it takes: "vector", "image" or "tokens").
REGISTRY: dict[str, tuple[Callable[..., keras.Model], str]] = {
    "mlp": (mlp.build, mlp.INPUT_KIND),
    "cnn": (cnn.build, cnn.INPUT_KIND),
    "transformer": (transformer.build, transformer.INPUT_KIND),
}


def get(name: str) -> tuple[Callable[..., keras.Model], str]:
    """`(build, input_kind)` for a model name; `ValueError` lists the names."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown model {name!r}; accepted: {', '.join(REGISTRY)}.")
    return REGISTRY[name]
