"""tfmp._messages: an exception's message in one line."""

import pytest

from tfmp._messages import first_line


@pytest.mark.parametrize("error, line", [
    (ValueError("bad shape"), "bad shape"),
    (ValueError("\n  bad shape\n  at layer 'dense'\n"), "bad shape"),  # Keras' leading newline
    (KeyError(), "KeyError"),  # no message: the class names it
    (RuntimeError("   \n"), "RuntimeError"),
])
def test_the_first_line_of_the_message_or_the_class_name(error, line):
    assert first_line(error) == line
