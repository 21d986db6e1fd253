"""The ISCO-08 classification (major and sub-major groups) shipped as package data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

__all__ = ["MajorGroup", "SubMajorGroup", "Taxonomy", "UnitGroup", "load_taxonomy"]


@dataclass(frozen=True)
class UnitGroup:
    code: str
    title: str


@dataclass(frozen=True)
class MajorGroup:
    code: str
    title: str


@dataclass(frozen=True)
class SubMajorGroup:
    code: str
    title: str
    major_code: str
    examples: tuple[UnitGroup, ...]


@dataclass(frozen=True)
class Taxonomy:
    major_groups: tuple[MajorGroup, ...]
    sub_major_groups: tuple[SubMajorGroup, ...]

    def sub_major(self, code: str) -> SubMajorGroup:
        for group in self.sub_major_groups:
            if group.code == code:
                return group
        raise KeyError(f"no ISCO-08 sub-major group {code!r}")

    def major(self, code: str) -> MajorGroup:
        for group in self.major_groups:
            if group.code == code:
                return group
        raise KeyError(f"no ISCO-08 major group {code!r}")

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(g.code for g in self.sub_major_groups)


def load_taxonomy() -> Taxonomy:
    """Read `personas/data/isco08.json`; sub-major groups are in ISCO order (11 ... 03)."""
    raw = json.loads(
        resources.files("personas").joinpath("data", "isco08.json").read_text(encoding="utf-8")
    )
    majors = tuple(MajorGroup(m["code"], m["title"]) for m in raw["major_groups"])
    subs = tuple(
        SubMajorGroup(
            code=s["code"],
            title=s["title"],
            major_code=s["code"][0],
            examples=tuple(UnitGroup(code, title) for code, title in s["examples"]),
        )
        for s in raw["sub_major_groups"]
    )
    return Taxonomy(majors, subs)
