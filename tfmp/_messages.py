"""One-line messages: tfmp names a failure in one line, whatever raised it, and says a warning once."""

import warnings


class TfmpWarning(RuntimeWarning):
    """A warning of tfmp's about the run (a policy that is a trap on the hardware, a loss
    scale that keeps falling). Python code sees it once, as this `RuntimeWarning`; tfmp's
    binaries show it as one absl log line (`tfmp.app.cli.run`)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Warns once with `TfmpWarning` (not also through absl logging: one message, one line).

    Args:
        message: The warning, one sentence.
        stacklevel: As `warnings.warn`'s, counted from the caller of `warn`.
    """
    warnings.warn(message, TfmpWarning, stacklevel=stacklevel + 1)


def first_line(e: BaseException, lines: int = 1, typed: bool = False) -> str:
    """The first line of an exception's message (its class name if the message is empty).

    Args:
        e: The exception, often from Keras, TensorFlow or a model's own code, whose
            message may run over many lines.
        lines: How many non-blank lines to keep, joined by a space (Keras' "could not be
            loaded" says why on the line after the first).
        typed: Start with the exception's class name (`"KeyError: 'x'"`; `"KeyError"`
            alone for an empty message).

    Returns:
        The message's first non-blank line (or `lines` of them), stripped: one line.

    Example:
        >>> first_line(ValueError("bad shape\\n  at layer dense"))
        'bad shape'
        >>> first_line(OSError("no such file"), typed=True)
        'OSError: no such file'
    """
    text = [line.strip() for line in str(e).splitlines() if line.strip()][:lines]
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {' '.join(text)}" if typed else " ".join(text)
