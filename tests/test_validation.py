import pytest

from core.validation import InputError, clean_message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        (None, "empty"),
        (b"\x00\x01binary", "Binary"),
        ("abc\x00def", "NUL"),
        ("bell\x07", "control characters"),
        ("bad \ud800 surrogate", "surrogates"),
        ("x" * 4001, "limit is 4,000"),
        (12345, "must be text"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(text, reason):
    with pytest.raises(InputError, match=reason):
        clean_message(text, 4000)


def test_good_message_is_kept_whole():
    text = "Hello\r\nI'm a nurse 👩‍⚕️ — and I like motorbikes.\tOK"
    assert clean_message(text, 4000) == "Hello\nI'm a nurse 👩‍⚕️ — and I like motorbikes.\tOK"
    assert clean_message("y" * 4000, 4000) == "y" * 4000
