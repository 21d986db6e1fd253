"""The personas the product knows: the shipped ISCO-800 plus sets imported or generated.

Imported and generated sets are JSONL files under `<data_dir>/personas/<name>.jsonl`,
one `Persona.to_dict()` per line (written atomically by `personas.importer.save_set`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from personas.records import SPLITS, Persona, PersonaFormatError

__all__ = [
    "SHIPPED_FILE",
    "CatalogError",
    "PersonaCatalog",
    "load_shipped",
    "personas_dir",
    "read_jsonl",
    "shipped_meta",
]

log = logging.getLogger(__name__)

SHIPPED_FILE = "isco800.jsonl"


class CatalogError(RuntimeError):
    """A stored persona set cannot be read."""


def personas_dir(source: Any) -> Path:
    """`<data_dir>/personas` for a `Settings` object or a data-dir path."""
    data_dir = getattr(source, "data_dir", source)
    return Path(data_dir) / "personas"


def read_jsonl(text: str, origin: str) -> list[Persona]:
    personas = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            personas.append(Persona.from_dict(json.loads(line)))
        except (json.JSONDecodeError, PersonaFormatError) as exc:
            raise CatalogError(f"{origin}, line {number}: {exc}") from exc
    return personas


def load_shipped() -> list[Persona]:
    """The shipped ISCO-800 (package data, no build step)."""
    text = resources.files("personas").joinpath("data", SHIPPED_FILE).read_text(encoding="utf-8")
    return read_jsonl(text, SHIPPED_FILE)


def shipped_meta() -> dict[str, Any]:
    """Seed, excluded groups and split assignment of the shipped set."""
    text = resources.files("personas").joinpath("data", "isco800.meta.json").read_text("utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class GroupCount:
    code: str
    title: str
    split: str
    count: int


class PersonaCatalog:
    """Read-only, in-memory view over one or more persona sets.

    Ids are unique across the catalog (`<set>:<local id>`); `get` also accepts the
    local id alone when only one set has it.
    """

    def __init__(self, personas: Sequence[Persona]):
        self._personas = list(personas)
        self._by_id: dict[str, Persona] = {}
        for persona in self._personas:
            if persona.id in self._by_id:
                raise CatalogError(f"duplicate persona id {persona.id!r}")
            self._by_id[persona.id] = persona

    @classmethod
    def load(cls, source: Any = None, sets: Sequence[str] | None = None) -> PersonaCatalog:
        """Shipped set plus every set under `<data_dir>/personas` (`source`: Settings or path).

        `sets` restricts the catalog to the named sets (`"isco800"` is the shipped one).
        """
        wanted = set(sets) if sets is not None else None
        personas: list[Persona] = []
        if wanted is None or "isco800" in wanted:
            personas.extend(load_shipped())
        if source is not None:
            directory = personas_dir(source)
            for path in sorted(directory.glob("*.jsonl")):
                if wanted is not None and path.stem not in wanted:
                    continue
                personas.extend(read_jsonl(path.read_text(encoding="utf-8"), str(path)))
        catalog = cls(personas)
        if wanted is not None:
            missing = wanted - set(catalog.set_names())
            if missing:
                raise CatalogError(f"no persona set named {', '.join(sorted(missing))}")
        log.debug("persona catalog: %d users in %s", len(catalog), catalog.set_names())
        return catalog

    def __len__(self) -> int:
        return len(self._personas)

    def __iter__(self) -> Iterator[Persona]:
        return iter(self._personas)

    def set_names(self) -> list[str]:
        return sorted({p.source for p in self._personas})

    def all(self, split: str | None = None, set_name: str | None = None) -> list[Persona]:
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}")
        return [
            p
            for p in self._personas
            if (split is None or p.split == split) and (set_name is None or p.source == set_name)
        ]

    def get(self, persona_id: str) -> Persona:
        if persona_id in self._by_id:
            return self._by_id[persona_id]
        matches = [p for p in self._personas if p.id.split(":", 1)[-1] == persona_id]
        if len(matches) == 1:
            return matches[0]
        if matches:
            ids = ", ".join(p.id for p in matches)
            raise KeyError(f"persona id {persona_id!r} is ambiguous: {ids}")
        raise KeyError(f"no persona with id {persona_id!r}")

    def search(
        self,
        text: str = "",
        split: str | None = None,
        isco_code: str | None = None,
        set_name: str | None = None,
    ) -> list[Persona]:
        """Case-insensitive match of every word of `text` in name, background or occupation."""
        words = text.lower().split()
        found = []
        for persona in self.all(split=split, set_name=set_name):
            if isco_code and persona.isco_code != isco_code:
                continue
            haystack = " ".join(
                (persona.name, persona.background, persona.isco_title, persona.traits.occupation)
            ).lower()
            if all(word in haystack for word in words):
                found.append(persona)
        return found

    def splits(self) -> dict[str, int]:
        return {split: sum(1 for p in self._personas if p.split == split) for split in SPLITS}

    def groups(self, split: str | None = None) -> list[GroupCount]:
        """Occupation groups present (imported sets without a code are left out)."""
        counts: dict[tuple[str, str, str], int] = {}
        for persona in self.all(split=split):
            if persona.isco_code:
                key = (persona.isco_code, persona.isco_title, persona.split)
                counts[key] = counts.get(key, 0) + 1
        return [GroupCount(c, t, s, n) for (c, t, s), n in sorted(counts.items())]
