"""Fails `import tfmp` with one clear line when TensorFlow is missing."""

_MESSAGE = (
    "tfmp needs TensorFlow, which is not installed: install it with the extra for "
    'your hardware: pip install "tfmp[cpu]" (tensorflow-cpu), "tfmp[gpu]" '
    '(tensorflow[and-cuda]) or "tfmp[tpu]" (tensorflow-tpu); from a checkout: '
    'pip install -e ".[cpu]".'
)


def require_tensorflow() -> None:
    """Raises `ImportError` naming the extras if TensorFlow cannot be imported."""
    try:
        import tensorflow  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise ImportError(_MESSAGE) from None
