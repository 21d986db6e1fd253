"""ISCO-800: taxonomy, deterministic build, data checks, splits, catalog, import, CLI, UI."""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from collections import Counter
from importlib import resources

import pytest

from core.settings import load_settings
from personas import cli
from personas.catalog import CatalogError, PersonaCatalog, load_shipped, shipped_meta
from personas.composer import (
    DEFAULT_SEED,
    SETBACKS_PER_GROUP,
    build_isco800,
    dumps_jsonl,
    load_pools,
    plan_splits,
)
from personas.importer import PersonaImportError, import_file, parse_file, parse_personas
from personas.records import SPLITS, Persona
from personas.stats import persona_stats
from personas.taxonomy import load_taxonomy
from personas.ui import build_personas_tab, persona_markdown, table_rows

SHIPPED = resources.files("personas").joinpath("data", "isco800.jsonl")


@pytest.fixture(scope="module")
def shipped() -> list[Persona]:
    return load_shipped()


@pytest.fixture
def settings(tmp_path):
    return load_settings(env={}, data_dir=tmp_path / "data")


def _run_cli(settings, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["personas", *argv])
    return args.func(args, settings)


# --------------------------------------------------------------------------- taxonomy
def test_taxonomy_has_the_isco08_groups():
    tax = load_taxonomy()
    assert len(tax.major_groups) == 10
    assert sorted(m.code for m in tax.major_groups) == list("0123456789")
    assert len(tax.sub_major_groups) == 43
    assert len(set(tax.codes)) == 43
    per_major = Counter(g.major_code for g in tax.sub_major_groups)
    assert per_major == {
        "1": 4, "2": 6, "3": 5, "4": 4, "5": 4, "6": 3, "7": 5, "8": 3, "9": 6, "0": 3,
    }  # fmt: skip
    for group in tax.sub_major_groups:
        assert re.fullmatch(r"\d\d", group.code)
        assert group.title and group.examples
        for unit in group.examples:
            assert re.fullmatch(r"\d{4}", unit.code) and unit.code.startswith(group.code)
    assert tax.sub_major("25").title == "Information and Communications Technology Professionals"
    assert tax.major("9").title == "Elementary Occupations"
    with pytest.raises(KeyError):
        tax.sub_major("99")


def test_composer_pools_cover_every_group():
    occupations, pools = load_pools()
    assert set(occupations) == set(load_taxonomy().codes)
    for code, group in occupations.items():
        assert len(group["roles"]) >= 4, code
        for role in group["roles"]:
            assert role["duties"] and role["places"], (code, role["title"])
            assert role.get("education") or group.get("education"), (code, role["title"])
    assert len(pools["cultures"]) >= 30


# --------------------------------------------------------------------------- build
def test_build_reproduces_shipped_file_byte_for_byte():
    text = dumps_jsonl(build_isco800(DEFAULT_SEED).personas)
    assert text.encode("utf-8") == SHIPPED.read_bytes()


def test_other_seed_gives_a_different_set():
    other = build_isco800(DEFAULT_SEED + 1)
    assert dumps_jsonl(other.personas).encode("utf-8") != SHIPPED.read_bytes()
    assert len(other.personas) == 800


def test_cli_build_is_fast_and_identical(settings, capsys):
    out = settings.data_dir / "b" / "isco800.jsonl"
    start = time.perf_counter()
    assert _run_cli(settings, "build", "--out", str(out)) == 0
    assert time.perf_counter() - start < 60
    assert out.read_bytes() == SHIPPED.read_bytes()
    meta = json.loads(out.with_name("isco800.meta.json").read_text())
    assert meta["seed"] == DEFAULT_SEED and meta == shipped_meta()
    assert "identical to the shipped" in capsys.readouterr().out


def test_meta_records_seed_excluded_groups_and_splits(shipped):
    meta = shipped_meta()
    plan = plan_splits(load_taxonomy(), meta["seed"])
    assert meta["excluded_groups"] == list(plan.excluded) and len(plan.excluded) == 3
    assert {s: len(meta["groups"][s]) for s in SPLITS} == {"train": 25, "validation": 5, "test": 10}
    used = [c for s in SPLITS for c in meta["groups"][s]]
    assert len(used) == len(set(used)) == 40
    assert not set(used) & set(meta["excluded_groups"])
    assert {p.isco_code for p in shipped} == set(used)


# --------------------------------------------------------------------------- data checks
def test_counts_and_no_split_leakage(shipped):
    assert len(shipped) == 800
    assert Counter(p.split for p in shipped) == {"train": 500, "validation": 100, "test": 200}
    per_group = Counter(p.isco_code for p in shipped)
    assert len(per_group) == 40 and set(per_group.values()) == {20}
    split_of_group: dict[str, set[str]] = {}
    for p in shipped:
        split_of_group.setdefault(p.isco_code, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of_group.values())
    groups_per_split = Counter(next(iter(s)) for s in split_of_group.values())
    assert groups_per_split == {"train": 25, "validation": 5, "test": 10}
    assert len({p.id for p in shipped}) == 800
    assert len({p.name for p in shipped}) == 800


def test_every_background_has_the_required_elements(shipped):
    for p in shipped:
        assert 50 <= p.word_count <= 100, (p.id, p.word_count)
        t = p.traits
        assert p.name in p.background
        assert t.occupation and t.occupation in p.background, p.id
        assert t.education and t.education in p.background, p.id
        assert t.personality and t.flaws, p.id
        lower = p.background.lower()
        assert all(x.lower() in lower for x in (*t.personality, *t.flaws, *t.hobbies)), p.id
        assert 1 <= len(t.hobbies) <= 3
        assert t.location in p.background and str(t.age) in p.background
        if t.setback:
            assert t.setback in p.background and t.setback_kind
        assert p.isco_title == load_taxonomy().sub_major(p.isco_code).title


def test_setback_rate_and_culture_spread(shipped):
    share = sum(p.has_setback for p in shipped) / len(shipped)
    assert share >= 0.25
    assert share == SETBACKS_PER_GROUP / 20
    kinds = Counter(p.traits.setback_kind for p in shipped if p.has_setback)
    assert len(kinds) >= 8
    surnames = {p.name for p in shipped}
    assert len(surnames) == 800
    # Names come from many cultures: count distinct given names and scripts of names.
    _, pools = __import__("personas.composer", fromlist=["load_pools"]).load_pools()
    culture_of = {}
    for culture in pools["cultures"]:
        for given in culture["female"] + culture["male"]:
            culture_of.setdefault(given, culture["name"])
    cultures = Counter(
        culture_of[w] for p in shipped for w in p.name.split() if w in culture_of
    )  # fmt: skip
    assert len(cultures) >= 35


def test_backgrounds_differ_in_structure_within_a_group():
    result = build_isco800(DEFAULT_SEED)
    by_group: dict[str, list] = {}
    for persona in result.personas:
        by_group.setdefault(persona.isco_code, []).append(result.signatures[persona.id])
    for code, signatures in by_group.items():
        assert len(set(signatures)) == 20, code
        orders = {tuple(element for element, _ in sig) for sig in signatures}
        openings = {sig[0] for sig in signatures}
        assert len(orders) >= 12, code
        assert len(openings) >= 5, code
    # Across the set, no sentence skeleton dominates: first three words vary widely.
    starts = Counter(" ".join(p.background.split()[2:5]) for p in result.personas)
    assert starts.most_common(1)[0][1] < 80


def test_stats_figures(shipped):
    stats = persona_stats(shipped)
    assert stats.count == 800 and stats.per_split["validation"] == 100
    assert stats.setback_share == pytest.approx(0.35)
    assert sum(n for _, _, n in stats.histogram) == 800
    assert stats.words_min >= 50 and stats.words_max <= 100
    assert len(stats.per_group) == 40


# --------------------------------------------------------------------------- catalog
def test_catalog_api(tmp_path, shipped):
    catalog = PersonaCatalog.load(tmp_path)
    assert len(catalog) == 800 and catalog.set_names() == ["isco800"]
    assert catalog.splits() == {"train": 500, "validation": 100, "test": 200}
    train = catalog.all(split="train")
    assert len(train) == 500 and all(p.split == "train" for p in train)
    first = shipped[0]
    assert catalog.get(first.id) == first
    assert catalog.get(first.id.split(":", 1)[1]) == first
    with pytest.raises(KeyError):
        catalog.get("isco800:nope")
    code = first.isco_code
    in_group = catalog.search(split=first.split, isco_code=code)
    assert len(in_group) == 20 and all(p.isco_code == code for p in in_group)
    hits = catalog.search(first.name)
    assert first in hits
    hobby = first.traits.hobbies[0]
    assert all(hobby.lower() in p.background.lower() for p in catalog.search(hobby))
    assert catalog.search("zzzz-not-there") == []
    with pytest.raises(ValueError):
        catalog.all(split="dev")
    with pytest.raises(CatalogError):
        PersonaCatalog.load(tmp_path, sets=["missing"])


# --------------------------------------------------------------------------- import
def _published(rows: int = 5) -> list[dict]:
    stages = ["train", "train", "validation", "test", "test"]
    return [
        {
            "stage": stages[i % 5],
            "id": i,
            "name": f"Person {i}",
            "prompt": f"Person {i} is a ferry mechanic in a harbour town who studied engineering, "
            f"is patient but stubborn, and spends weekends sailing; case number {i}.",
            "expand_id": i * 10,
        }
        for i in range(rows)
    ]


def test_import_published_format(tmp_path):
    path = tmp_path / "isco800-published.json"
    path.write_text(json.dumps(_published()), encoding="utf-8")
    result = import_file(path, tmp_path / "data", name="paper")
    assert result.count == 5 and result.splits == {"train": 2, "validation": 1, "test": 2}
    catalog = PersonaCatalog.load(tmp_path / "data")
    assert catalog.set_names() == ["isco800", "paper"]
    person = catalog.get("paper:3")
    assert person.name == "Person 3" and person.split == "test" and person.source == "paper"
    assert len(catalog.all(split="test", set_name="paper")) == 2
    only = PersonaCatalog.load(tmp_path / "data", sets=["paper"])
    assert len(only) == 5
    with pytest.raises(FileExistsError):
        import_file(path, tmp_path / "data", name="paper")
    assert import_file(path, tmp_path / "data", name="paper", replace=True).count == 5


def test_import_with_a_broken_row_is_rejected_whole(tmp_path):
    rows = _published(6)
    rows[2]["stage"] = "dev"
    del rows[4]["prompt"]
    rows[5]["prompt"] = "too short"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    data_dir = tmp_path / "data"
    with pytest.raises(PersonaImportError) as info:
        import_file(path, data_dir, name="bad")
    message = str(info.value)
    assert "row 3 (id 2): stage 'dev' is not one of train, validation, test" in message
    assert "row 5 (id 4): missing 'prompt'" in message
    assert "row 6 (id 5): background has 2 words" in message
    assert "nothing was imported" in message
    assert len(info.value.problems) == 3
    assert not (data_dir / "personas").exists() or not list((data_dir / "personas").iterdir())
    assert PersonaCatalog.load(data_dir).set_names() == ["isco800"]


def test_import_jsonl_and_csv(tmp_path):
    text = (
        "Lena Berg repairs trams in Gothenburg, studied mechanics, is cheerful but moody, "
        "and climbs rocks on weekends."
    )
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        json.dumps({"name": "Lena Berg", "background": text, "split": "validation"})
        + "\n\n"
        + json.dumps({"id": "x2", "name": "Ola", "background": text.replace("Lena", "Ola")})
        + "\n",
        encoding="utf-8",
    )
    result = import_file(jsonl, tmp_path / "data")
    assert result.name == "mine" and result.splits == {"train": 1, "validation": 1, "test": 0}
    csv_path = tmp_path / "Team Users.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "background", "isco_code"])
        writer.writerow(["Ana", text.replace("Lena Berg", "Ana"), "72"])
        writer.writerow(
            ["Bo", "Bo, a baker, kneads dough at dawn, loves jazz, is kind yet vain.", ""]
        )
    result = import_file(csv_path, tmp_path / "data", default_split="test")
    assert result.name == "team-users" and result.splits["test"] == 2
    catalog = PersonaCatalog.load(tmp_path / "data")
    assert catalog.get("team-users:0001").isco_code == "72"
    assert catalog.get("mine:x2").split == "train"


def test_malformed_files_name_the_row_and_problem(tmp_path):
    cases = {
        "a.jsonl": ('{"name": "A", "background": "x"}\nnot json\n', "line 2: invalid JSON"),
        "b.csv": ("name,bio\nA,b\n", "line 1: CSV header lacks column(s) background"),
        "c.csv": ('name,background\nA,"one two three four five six seven eight nine ten",x\n',
                  "line 2: more fields than the header has columns"),
        "d.json": ('{"stage": "train"}', "expected a JSON list"),
        "e.json": ("[1, 2", "invalid JSON at line 1"),
        "f.txt": ("hello", "unknown file type '.txt'"),
        "g.jsonl": ("", "the file holds no backgrounds"),
    }  # fmt: skip
    for filename, (content, expected) in cases.items():
        path = tmp_path / filename
        path.write_text(content, encoding="utf-8")
        with pytest.raises(PersonaImportError) as info:
            parse_file(path, "t")
        assert expected in str(info.value), (filename, str(info.value))
    dup = tmp_path / "dup.json"
    rows = _published(2)
    rows[1]["id"] = 0
    dup.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(PersonaImportError, match=r"id 't:0' appears 2 times .*\(row 1, row 2\)"):
        parse_file(dup, "t")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("name,background\nJosé,caf\xe9\n".encode("latin-1"))
    with pytest.raises(PersonaImportError, match="not UTF-8"):
        parse_file(latin, "t")


def _published_test_file(users: int = 200) -> list[dict]:
    """The published TEST file's shape: every user twice, expand_id 1..N then N+1..2N."""
    rows = []
    for copy in range(2):
        for i in range(users):
            rows.append(
                {
                    "stage": "test",
                    "id": 600 + i,
                    "name": f"Tester {i}",
                    "prompt": f"Tester {i} drives a night bus in Lyon, studied history, is calm "
                    f"but secretive, and restores old radios at home; file {i}.",
                    "expand_id": copy * users + i + 1,
                }
            )
    return rows


def test_published_test_file_merges_exact_duplicates(tmp_path, settings, caplog, capsys):
    path = tmp_path / "isco800_test.json"
    path.write_text(json.dumps(_published_test_file()), encoding="utf-8")
    with caplog.at_level("WARNING", logger="personas.importer"):
        parsed = parse_personas(path, "t", default_split="test")
    assert len(parsed.personas) == 200 and parsed.merged_duplicates == 200
    assert "merged 200 duplicate rows" in caplog.text
    assert len({p.id for p in parsed.personas}) == 200
    result = import_file(path, tmp_path / "data", name="paper-test")
    assert result.count == 200 and result.merged_duplicates == 200
    assert result.splits == {"train": 0, "validation": 0, "test": 200}
    assert _run_cli(settings, "import", str(path), "--name", "pt") == 0
    out = capsys.readouterr().out
    assert "imported 200 users" in out and "merged 200 duplicates" in out


def test_conflicting_rows_under_one_id_are_an_error_naming_them(tmp_path):
    rows = _published_test_file(5)
    rows[7]["prompt"] = rows[7]["prompt"].replace("night bus", "tram")
    path = tmp_path / "conflict.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(PersonaImportError) as info:
        parse_file(path, "t")
    assert info.value.problems == [
        "id 't:602' appears 2 times with a different name, background or split (row 3, row 8)"
    ]


def test_set_names_are_checked(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(_published(1)), encoding="utf-8")
    for bad in ("isco800", "../evil", "Upper", "-x"):
        with pytest.raises(ValueError):
            import_file(path, tmp_path / "data", name=bad)


# --------------------------------------------------------------------------- CLI
def test_cli_import_show_stats_delete(settings, tmp_path, capsys):
    good = tmp_path / "pub.json"
    good.write_text(json.dumps(_published()), encoding="utf-8")
    bad = tmp_path / "broken.json"
    rows = _published()
    rows[1]["name"] = ""
    bad.write_text(json.dumps(rows), encoding="utf-8")
    assert _run_cli(settings, "import", str(bad)) == 2
    assert "row 2 (id 1): 'name' is empty" in capsys.readouterr().out
    assert _run_cli(settings, "import", str(good), "--name", "pub") == 0
    assert "imported 5 users as set 'pub'" in capsys.readouterr().out
    assert _run_cli(settings, "show", "pub:1") == 0
    assert "Person 1" in capsys.readouterr().out
    shipped_id = load_shipped()[0].id
    assert _run_cli(settings, "show", shipped_id, "--json") == 0
    assert json.loads(capsys.readouterr().out)["id"] == shipped_id
    assert _run_cli(settings, "show", "nobody") == 2
    capsys.readouterr()
    assert _run_cli(settings, "stats", "--no-diversity", "--json") == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["count"] == 805 and payload["per_set"] == {"isco800": 800, "pub": 5}
    assert payload["setback_share"] == pytest.approx(0.35)
    assert _run_cli(settings, "stats", "--no-diversity", "--set", "isco800") == 0
    out = capsys.readouterr().out
    assert (
        "with a setback: 35.0%" in out and "per split: train 500, validation 100, test 200" in out
    )
    assert _run_cli(settings, "delete", "pub") == 0
    assert _run_cli(settings, "delete", "pub") == 1


# --------------------------------------------------------------------------- UI
def test_ui_rows_and_detail(shipped):
    catalog = PersonaCatalog(shipped)
    assert len(table_rows(catalog)) == 800
    test_rows = table_rows(catalog, split="test")
    assert len(test_rows) == 200 and {r[2] for r in test_rows} == {"test"}
    code = shipped[0].isco_code
    assert {r[3] for r in table_rows(catalog, group=code)} == {code}
    detail = persona_markdown(shipped[0])
    assert shipped[0].name in detail and shipped[0].traits.hobbies[0] in detail


def test_ui_tab_builds_inside_blocks(shipped):
    import gradio as gr

    with gr.Blocks() as demo, gr.Tab("Personas"):
        build_personas_tab(PersonaCatalog(shipped))
    tables = [b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)]
    assert len(tables) == 1
    assert len(tables[0].value["data"]) == 800
    handlers = {fn.name: fn.fn for fn in demo.fns.values()}
    chosen = shipped[5]
    event = gr.SelectData(None, {"index": [5, 0], "value": chosen.id, "row_value": [chosen.id]})
    assert chosen.background in handlers["show"](event)
    rows = handlers["refresh"](chosen.name, "all", chosen.isco_code)
    assert [r[0] for r in rows] == [chosen.id]
