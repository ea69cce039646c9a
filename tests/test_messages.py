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


def test_several_lines_are_joined_into_one():
    # Keras' load_weights error: what does not fit is said on the line after the first
    error = ValueError("A total of 1 objects could not be loaded. Example error message for "
                       "object <Dense>:\n\nThe shapes must match.\n [[0.1 0.2]]\n\nList of objects")
    assert first_line(error, lines=2) == ("A total of 1 objects could not be loaded. Example "
                                          "error message for object <Dense>: The shapes must match.")
    assert first_line(error) == first_line(error, lines=1)
    assert first_line(KeyError(), lines=3) == "KeyError"


def test_typed_starts_with_the_class_name_once():
    assert first_line(OSError("no such file\nat /x"), typed=True) == "OSError: no such file"
    assert first_line(KeyError(), typed=True) == "KeyError"  # not "KeyError: KeyError"
