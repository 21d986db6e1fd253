"""Checks on user-supplied chat text; every rejection says exactly why."""

from __future__ import annotations

import unicodedata

__all__ = ["InputError", "clean_message"]

_ALLOWED_CONTROLS = {"\n", "\t", "\r"}


class InputError(ValueError):
    """A message that cannot be accepted; the text is meant for the user."""


def clean_message(text: object, max_chars: int) -> str:
    """Return the message to store, or raise `InputError` with a clear reason.

    Nothing is silently dropped or truncated: bad input is refused as a whole.
    """
    if text is None:
        raise InputError("Your message is empty.")
    if isinstance(text, bytes):
        raise InputError("Binary data cannot be sent as a chat message.")
    if not isinstance(text, str):
        raise InputError("A chat message must be text.")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise InputError("Your message contains invalid characters (unpaired surrogates).")
    if "\x00" in text:
        raise InputError("Your message contains NUL characters, which looks like binary data.")
    controls = sorted(
        {f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) == "Cc"}
        - {f"U+{ord(c):04X}" for c in _ALLOWED_CONTROLS}
    )
    if controls:
        raise InputError(f"Your message contains control characters ({', '.join(controls[:5])}).")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise InputError("Your message is empty.")
    if len(text) > max_chars:
        raise InputError(
            f"Your message is {len(text):,} characters long; the limit is {max_chars:,}. "
            "Please shorten it."
        )
    return text.strip()
