"""`tools/audit`'s work on a saved model: audit it as it was built, and fix it keeping its compile settings."""

from __future__ import annotations

import keras

from tfmp.rewrite import AuditReport, audit, enforce_float32, is_copyable, model_policy


def audit_saved(model: keras.Model) -> AuditReport:
    """Audits a loaded model against the policy it was built with (not Keras' global one).

    Args:
        model: A model loaded from a `.keras` file.

    Returns:
        The `AuditReport` (its optimizer checked when the model was compiled).
    """
    return audit(model, getattr(model, "optimizer", None), policy=model_policy(model))


def fixed_copy(model: keras.Model) -> keras.Model:
    """`tfmp.enforce_float32(model)`, compiled as `model` was (same loss, metrics, optimizer config).

    Args:
        model: A Sequential or Functional model of Keras' own classes.

    Returns:
        The fixed copy.

    Raises:
        ValueError: any other kind of model (one line): its fix would be made in place,
            and a `.keras` file does not keep it.
    """
    if not is_copyable(model):
        raise ValueError(
            f"cannot write a fixed copy of {model.name!r}: it is a {type(model).__name__}, which "
            "Keras re-creates through its own constructor when loading, so per-layer dtypes are "
            "not kept in a .keras file; fix it in its code, or call tfmp.prepare() or "
            "tfmp.convert_policy() on it after loading")
    fixed = enforce_float32(model)
    compile_config = model.get_compile_config() if model.compiled else None
    if compile_config:
        fixed.compile_from_config(compile_config)
    return fixed
