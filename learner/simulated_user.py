"""The simulated user: a role-play agent speaking as one persona."""

from __future__ import annotations

import re
from collections.abc import Sequence

from chatbot.prompting import load_prompt
from chatbot.types import ChatMessage
from learner.records import PersonaLike

__all__ = ["clean_user_text", "user_messages", "user_prompt_version"]

_SPEAKER = re.compile(r"^\s*\**\s*([A-Z][\w .'-]{0,30})\s*\**\s*:\s*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_OTHER_SIDE = re.compile(r"\n\s*\**\s*(?:chatbot|assistant|bot|ai|user)\s*\**\s*:", re.IGNORECASE)


def user_prompt_version() -> str:
    return "+".join(
        load_prompt(n, "learner").version for n in ("simulated_user", "simulated_user_intro")
    )


def user_messages(
    persona: PersonaLike, history: Sequence[tuple[str, str]], *, first_turn: bool
) -> list[ChatMessage]:
    """Messages for the user model; roles are flipped so the user model is the assistant.

    ``history`` is from the chatbot's point of view (``assistant`` = chatbot).
    """
    system = load_prompt("simulated_user", "learner").fill(
        name=persona.name, background=persona.background
    )
    if first_turn:
        system += "\n" + str(load_prompt("simulated_user_intro", "learner"))
    flipped = [
        ChatMessage("user" if role == "assistant" else "assistant", content)
        for role, content in history
    ]
    return [ChatMessage("system", system), *flipped]


def clean_user_text(text: str, name: str) -> str:
    """Strip a leading speaker label and anything written for the other side."""
    text = _CONTROL.sub("", text).strip()
    cut = _OTHER_SIDE.search(text)
    if cut:
        text = text[: cut.start()]
    match = _SPEAKER.match(text)
    if match and match.group(1).strip().lower() in (name.lower(), name.split()[0].lower(), "me"):
        text = text[match.end() :]
    return text.strip().strip('"').strip()
