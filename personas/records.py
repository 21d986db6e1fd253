"""Typed records for simulated users: `Persona` and its structured `Traits`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SPLITS", "Persona", "PersonaFormatError", "Traits", "word_count"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")


class PersonaFormatError(ValueError):
    """A persona record does not have the required shape."""


def word_count(text: str) -> int:
    return len(text.split())


def _str_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PersonaFormatError(f"traits.{name} must be a list of strings")


@dataclass(frozen=True)
class Traits:
    """Hidden facts behind a background; evaluation checks the chatbot against them.

    `personality` holds the person's qualities and `flaws` the difficult ones; both are
    part of the personality. Imported backgrounds usually have empty traits.
    """

    occupation: str = ""
    education: str = ""
    personality: tuple[str, ...] = ()
    flaws: tuple[str, ...] = ()
    hobbies: tuple[str, ...] = ()
    setback: str | None = None
    setback_kind: str | None = None
    age: int | None = None
    location: str = ""
    workplace: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.occupation or self.education or self.personality or self.hobbies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "occupation": self.occupation,
            "education": self.education,
            "personality": list(self.personality),
            "flaws": list(self.flaws),
            "hobbies": list(self.hobbies),
            "setback": self.setback,
            "setback_kind": self.setback_kind,
            "age": self.age,
            "location": self.location,
            "workplace": self.workplace,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Traits:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PersonaFormatError("traits must be an object")
        known = {
            "occupation", "education", "personality", "flaws", "hobbies",
            "setback", "setback_kind", "age", "location", "workplace",
        }  # fmt: skip
        unknown = sorted(set(data) - known)
        if unknown:
            raise PersonaFormatError(f"unknown traits field(s): {', '.join(unknown)}")
        age = data.get("age")
        if age is not None and (not isinstance(age, int) or isinstance(age, bool)):
            raise PersonaFormatError("traits.age must be an integer")
        for key in ("occupation", "education", "location", "workplace"):
            if not isinstance(data.get(key, ""), str):
                raise PersonaFormatError(f"traits.{key} must be a string")
        for key in ("setback", "setback_kind"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise PersonaFormatError(f"traits.{key} must be a string or null")
        return cls(
            occupation=data.get("occupation", ""),
            education=data.get("education", ""),
            personality=_str_tuple(data.get("personality"), "personality"),
            flaws=_str_tuple(data.get("flaws"), "flaws"),
            hobbies=_str_tuple(data.get("hobbies"), "hobbies"),
            setback=data.get("setback") or None,
            setback_kind=data.get("setback_kind") or None,
            age=age,
            location=data.get("location", ""),
            workplace=data.get("workplace", ""),
        )


@dataclass(frozen=True)
class Persona:
    """One simulated user. `id` is unique within a catalog (`<set>:<local id>`)."""

    id: str
    name: str
    background: str
    split: str
    isco_code: str = ""
    isco_title: str = ""
    source: str = ""
    traits: Traits = field(default_factory=Traits)

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise PersonaFormatError("id must be a non-empty string")
        if not isinstance(self.name, str) or not self.name.strip():
            raise PersonaFormatError("name must be a non-empty string")
        if not isinstance(self.background, str) or not self.background.strip():
            raise PersonaFormatError("background must be a non-empty string")
        if self.split not in SPLITS:
            raise PersonaFormatError(
                f"split must be one of {', '.join(SPLITS)}, not {self.split!r}"
            )

    @property
    def word_count(self) -> int:
        return word_count(self.background)

    @property
    def has_setback(self) -> bool:
        return self.traits.setback is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "split": self.split,
            "isco_code": self.isco_code,
            "isco_title": self.isco_title,
            "source": self.source,
            "background": self.background,
            "traits": self.traits.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Persona:
        if not isinstance(data, dict):
            raise PersonaFormatError("a persona must be a JSON object")
        for key in ("id", "name", "background", "split"):
            if key not in data:
                raise PersonaFormatError(f"missing field {key!r}")
        for key in ("isco_code", "isco_title", "source"):
            if not isinstance(data.get(key, ""), str):
                raise PersonaFormatError(f"{key} must be a string")
        return cls(
            id=str(data["id"]),
            name=data["name"],
            background=data["background"],
            split=data["split"],
            isco_code=data.get("isco_code", ""),
            isco_title=data.get("isco_title", ""),
            source=data.get("source", ""),
            traits=Traits.from_dict(data.get("traits")),
        )
