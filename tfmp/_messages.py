"""One-line error messages: tfmp names a failure in one line, whatever raised it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name if the message is empty).

    Args:
        e: The exception, often from Keras, TensorFlow or a model's own code, whose
            message may run over many lines.

    Returns:
        The message's first non-blank line, stripped.

    Example:
        >>> first_line(ValueError("bad shape\\n  at layer dense"))
        'bad shape'
    """
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
