"""Dialogue export: formats round-trip with standard tools, filters, PII scrubbing, safe paths."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime

import pytest
from sqlalchemy import text

from core.settings import load_settings
from learner.export import (
    SALT_ENV,
    ExportCancelled,
    ExportError,
    ExportFilters,
    ExportOptions,
    ExportPathError,
    _HfDatasetWriter,
    export,
    hash_user_id,
    list_exports,
    resolve_export_file,
)
from learner.export.reader import DialogueReader
from learner.export_cli import register
from learner.pii import PII_KINDS, PiiScrubber, ScrubCounts, build_user_terms
from learner.pii_eval import evaluate_pii, load_pii_sample
from storage import Database
from storage.corpus_models import DialogueRow, RunRow, TurnRow
from storage.memory_models import MemoryFactRow
from storage.models import Conversation, Feedback, Message, User

PLANTED = [
    "alice@example.com",
    "Alice Smith",
    "Lisbon",
    "https://example.org/tips",
    "555 123 4567",
    "Globex",
    "sim@persona.test",
]


def _score(rel: int, int_: int, val: int, why: str) -> dict:
    return {
        "rel": rel,
        "int": int_,
        "val": val,
        "reasons": {"rel": f"rel {why}", "int": f"int {why}", "val": f"val {why}"},
        "critic_model_id": "critic-x",
    }


@pytest.fixture
def world(db_url, tmp_path):
    # SQLite in the settings' own data dir, or the test's PostgreSQL database.
    database_url = None if db_url.startswith("sqlite") else db_url
    settings = load_settings(env={}, data_dir=tmp_path / "data", database_url=database_url)
    db = Database(settings.db_url, data_dir=settings.data_dir)
    ids: dict[str, str] = {}
    with db.session() as s:
        alice = User(username="alice.smith")
        bob = User(username="bob", excluded_from_training=True)
        carol = User(username="carol")
        s.add_all([alice, bob, carol])
        s.flush()
        ids.update(alice=alice.id, bob=bob.id, carol=carol.id)
        s.add_all(
            [
                MemoryFactRow(
                    user_id=alice.id, category="location", key="location", text="lives in Lisbon"
                ),
                MemoryFactRow(
                    user_id=alice.id,
                    category="occupation",
                    key="employer",
                    text="works at Globex Corporation",
                ),
            ]
        )

        def conv(user: User, day: str, adapter: str = "base") -> Conversation:
            c = Conversation(
                user_id=user.id, adapter_id=adapter, created_at=datetime.fromisoformat(day)
            )
            s.add(c)
            s.flush()
            return c

        def msg(c: Conversation, seq: int, role: str, content: str, **kw) -> Message:
            m = Message(conversation_id=c.id, seq=seq, role=role, content=content, **kw)
            s.add(m)
            s.flush()
            return m

        a1 = conv(alice, "2024-01-10")
        msg(a1, 0, "user", "Hi, I'm Alice Smith from Lisbon, mail me at alice@example.com")
        msg(
            a1,
            1,
            "assistant",
            "Hello Alice! See https://example.org/tips.",
            status="superseded",
            adapter_id="base",
        )
        final = msg(
            a1,
            2,
            "assistant",
            "Hello! Call +1 555 123 4567 today.",
            adapter_id="a1",
            model_id="smol",
            gen_params={"temperature": 0.7},
            latency_ms=12.5,
        )
        s.add(Feedback(message_id=final.id, user_id=alice.id, rating=1, reason="great answer"))
        a2 = conv(alice, "2024-02-10", adapter="a2")
        msg(a2, 0, "user", "I work at Globex Corporation")
        bad = msg(a2, 1, "assistant", "That sounds fun.", adapter_id="a2")
        s.add(Feedback(message_id=bad.id, user_id=alice.id, rating=-1, reason="boring"))
        b1 = conv(bob, "2024-01-15")
        msg(b1, 0, "user", "write to bob@mail.com")
        msg(b1, 1, "assistant", "ok", adapter_id="base")
        c1 = conv(carol, "2024-03-01")
        msg(c1, 0, "user", "what is 2+2?")
        msg(c1, 1, "assistant", "4", adapter_id="base")
        c2 = conv(carol, "2024-03-02")
        msg(c2, 0, "user", "hello?")
        ids.update(a1=a1.id, a2=a2.id, b1=b1.id, c1=c1.id, c2=c2.id)

        run = RunRow(iteration=1, split="train", status="done")
        s.add(run)
        s.flush()
        d1 = DialogueRow(
            run_id=run.id,
            persona_id="p-001",
            persona_name="Sim Persona",
            status="done",
            greeting="Hi there! How are you?",
            user_intro="I'm a baker, reach me at sim@persona.test",
            critic_model_id="critic-x",
            created_at=datetime.fromisoformat("2024-02-20"),
        )
        s.add(d1)
        s.flush()
        s.add_all(
            [
                TurnRow(
                    dialogue_id=d1.id,
                    turn_index=2,
                    user_message=d1.user_intro,
                    first_reply="Ok.",
                    first_score=_score(2, 1, 2, "weak"),
                    final_reply="Baking is wonderful, what do you bake?",
                    final_score=_score(5, 4, 4, "good"),
                    regenerations=1,
                    user_answer="Bread mostly.",
                ),
                TurnRow(
                    dialogue_id=d1.id,
                    turn_index=3,
                    user_message="Bread mostly.",
                    first_reply="Sourdough is a great choice.",
                    first_score=_score(4, 4, 4, "fine"),
                    final_reply="Sourdough is a great choice.",
                    final_score=_score(4, 4, 4, "fine"),
                ),
            ]
        )
        ids["d1"] = d1.id
    yield settings, db, ids
    db.dispose()


def _run(settings, db, *, formats=("jsonl",), env=None, **kw):
    filters = kw.pop("filters", ExportFilters())
    options = ExportOptions(formats=formats, filters=filters, **kw)
    return export(db, settings.exports_dir, options, env=env or {SALT_ENV: "pepper"})


def _jsonl(result) -> list[dict]:
    return [json.loads(line) for line in result.files["jsonl"].read_text().splitlines()]


def test_every_format_round_trips_with_standard_tools(world, tmp_path):
    import pandas as pd
    from datasets import load_dataset, load_from_disk

    settings, db, ids = world
    seen = []
    result = export(
        db,
        settings.exports_dir,
        ExportOptions(),
        progress=seen.append,
        env={},
        runs_dir=settings.runs_dir,
    )
    assert (result.conversations, result.real, result.synthetic) == (4, 3, 1)
    assert (result.skipped_opted_out, result.skipped_empty) == (1, 1)
    assert result.messages == 2 + 2 + 2 + 5
    assert seen[-1].phase == "done" and seen[-1].messages == result.messages
    assert result.salt_source == "generated" and len(result.salt) == 32

    ds = load_dataset(
        "json", data_files=str(result.files["jsonl"]), split="train", cache_dir=str(tmp_path / "c")
    )
    assert len(ds) == 4
    by_id = {row["upc"]["id"]: row for row in ds}
    a1 = by_id[ids["a1"]]
    assert [m["role"] for m in a1["messages"]] == ["user", "assistant"]
    bot = a1["upc_turns"][1]
    assert (
        bot["adapter_id"] == "a1"
        and bot["feedback"] == 1
        and bot["feedback_reason"] == "great answer"
    )
    assert bot["regenerations"] == 1
    assert [a["origin"] for a in bot["regeneration_history"]] == ["initial", "user"]
    assert bot["regeneration_history"][-1]["content"] == a1["messages"][1]["content"]
    assert a1["upc"]["user"] == hash_user_id(ids["alice"], result.salt)
    d1 = by_id[ids["d1"]]
    assert d1["upc"]["source"] == "synthetic" and d1["upc"]["iteration"] == 1
    scored = d1["upc_turns"][2]
    assert (scored["critic"]["rel"], scored["critic"]["int"], scored["critic"]["val"]) == (5, 4, 4)
    assert scored["critic"]["reasons"]["rel"] == "rel good"
    assert scored["first_critic"]["rel"] == 2 and scored["regenerations"] == 1
    assert d1["upc"]["mean_score"] == pytest.approx((13 / 3 + 4) / 2)

    df = pd.read_parquet(result.files["parquet"])
    assert len(df) == result.messages
    row = df[(df.conversation_id == ids["d1"]) & (df.turn == 2)].iloc[0]
    assert (row["rel"], row["int"], row["val"], row["reason_val"]) == (5, 4, 4, "val good")
    assert json.loads(row["regeneration_history_json"])[0]["content"] == "Ok."

    hf = load_from_disk(str(result.files["hf"]))
    assert len(hf) == 4 and set(hf.column_names) == {"messages", "upc", "upc_turns"}
    assert result.files["hf_zip"].stat().st_size > 0

    share = json.loads(result.files["sharegpt"].read_text())
    assert len(share) == 4
    first = next(x for x in share if x["id"] == ids["a1"])
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt"]

    # User ids are hashed and the salt never reaches the export directory.
    blob = b"".join(p.read_bytes() for p in result.directory.rglob("*") if p.is_file())
    for uid in (ids["alice"], ids["carol"]):
        assert uid.encode() not in blob
    assert result.salt.encode() not in blob
    assert b"alice.smith" not in blob
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["conversations"] == 4 and "salt" not in manifest
    run_record = json.loads(
        (settings.runs_dir / "exports" / f"{result.export_id}.json").read_text()
    )
    assert run_record["salt"] == result.salt
    assert list_exports(settings.exports_dir)[0]["export_id"] == result.export_id
    assert not (result.directory / ".tmp").exists()


def test_pages_stream_from_one_server_side_cursor(world):
    settings, db, _ = world
    one = _jsonl(_run(settings, db, chunk_size=1, export_id="pages-of-one"))
    big = _jsonl(_run(settings, db, chunk_size=500, export_id="one-page"))
    assert len(one) == 4 and one == big  # same records, same order, whatever the page size
    reader = DialogueReader(db, ExportFilters(), "salt", chunk_size=1)
    records = reader.iter_real()
    first, _ = next(records)
    if not db.is_sqlite:
        # Mid-export, the reading backend sits on a cursor it fetches from page by page.
        with db.engine.connect() as con:
            queries = con.scalars(
                text(
                    "SELECT query FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
        assert any(q.startswith("FETCH FORWARD 1 FROM") for q in queries), queries
    streamed = [first.meta.id, *(record.meta.id for record, _ in records)]
    exported = [r["upc"]["id"] for r in one if r["upc"]["source"] == "real"]
    # Every opted-in conversation, in order (the export then drops the empty one).
    assert len(streamed) == 4 and [i for i in streamed if i in exported] == exported


def test_hf_dataset_writer_shards_and_matches_jsonl(world, tmp_path):
    from datasets import load_from_disk

    settings, db, _ = world
    rows = _jsonl(_run(settings, db))
    # One conversation per batch and a 1-byte shard limit: one shard per conversation.
    writer = _HfDatasetWriter(tmp_path / "hf", batch_rows=1, max_shard_bytes=1)
    for row in rows:
        writer.write(None, row)
    writer.close()
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.arrow"))
    assert shards == [f"data-{i:05d}-of-{len(rows):05d}.arrow" for i in range(len(rows))]
    loaded = load_from_disk(str(tmp_path / "hf"))
    assert [r["upc"]["id"] for r in loaded] == [r["upc"]["id"] for r in rows]
    assert [r["messages"] for r in loaded] == [r["messages"] for r in rows]
    assert not list(tmp_path.glob(".hf.partial"))
    empty = _HfDatasetWriter(tmp_path / "empty")
    empty.close()
    assert len(load_from_disk(str(tmp_path / "empty"))) == 0


def test_scrub_counts_match_planted_pii(world):
    settings, db, _ = world
    result = _run(settings, db)
    # a1: name x2 (user msg + superseded reply), fact Lisbon, email, url, phone;
    # a2: "Globex Corporation"; d1: one e-mail in the simulated user's intro.
    planted = {"email": 2, "phone": 1, "url": 1, "name": 2, "fact": 1 + 1}
    assert result.scrubbed.to_dict() == {kind: planted.get(kind, 0) for kind in PII_KINDS}
    text = result.files["jsonl"].read_text()
    for planted in PLANTED:
        assert planted not in text
    for placeholder in ("[EMAIL]", "[PHONE]", "[URL]", "[NAME]", "[FACT]"):
        assert placeholder in text

    raw = _run(settings, db, scrub=False)
    assert raw.scrubbed.total == 0
    assert "alice@example.com" in raw.files["jsonl"].read_text()


def test_salt_from_env_gives_stable_hashes(world):
    settings, db, ids = world
    one = _run(settings, db, env={SALT_ENV: "s1"})
    two = _run(settings, db, env={SALT_ENV: "s1"})
    other = _run(settings, db, env={SALT_ENV: "s2"})
    users = [
        {r["upc"]["user"] for r in _jsonl(x) if r["upc"]["source"] == "real"}
        for x in (one, two, other)
    ]
    assert (
        users[0] == users[1] == {hash_user_id(ids["alice"], "s1"), hash_user_id(ids["carol"], "s1")}
    )
    assert users[0].isdisjoint(users[2])
    assert one.salt_source == "env"


FILTER_CASES = {
    "dates": (
        {"since": datetime(2024, 2, 1), "until": datetime(2024, 3, 1)},
        {"a2", "d1"},
    ),
    "username": ({"users": ("alice.smith",)}, {"a1", "a2"}),
    "adapter_a1": ({"adapters": ("a1",)}, {"a1"}),
    "adapter_base": ({"adapters": ("base",)}, {"c1", "d1"}),
    "min_score": ({"min_score": 4.1}, {"d1"}),
    "min_score_high": ({"min_score": 4.2}, set()),
    "max_score": ({"max_score": 4.1}, set()),
    "source_real": ({"sources": ("real",)}, {"a1", "a2", "c1"}),
    "source_synthetic": ({"sources": ("synthetic",)}, {"d1"}),
    "source_regenerated": ({"sources": ("regenerated",)}, {"a1", "d1"}),
    "liked": ({"feedback": "liked"}, {"a1"}),
    "disliked": ({"feedback": "disliked"}, {"a2"}),
    "no_feedback": ({"feedback": "none"}, {"c1", "d1"}),
    "opted_out": ({"include_opted_out": True, "sources": ("real",)}, {"a1", "a2", "b1", "c1"}),
}


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_filters_select_exactly(world, case):
    settings, db, ids = world
    kwargs, expected = FILTER_CASES[case]
    if case == "username":
        kwargs = {"users": ("alice.smith",)}
    result = _run(settings, db, filters=ExportFilters(**kwargs))
    got = {r["upc"]["id"] for r in _jsonl(result)}
    assert got == {ids[k] for k in expected}
    assert result.conversations == len(expected)


def test_user_filter_accepts_ids(world):
    settings, db, ids = world
    result = _run(settings, db, filters=ExportFilters(users=(ids["carol"],)))
    assert [r["upc"]["id"] for r in _jsonl(result)] == [ids["c1"]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"filters": ExportFilters(users=("nobody",))},
        {"filters": ExportFilters(sources=("fake",))},
        {"filters": ExportFilters(feedback="meh")},
        {"filters": ExportFilters(min_score=4.5, max_score=4.0)},
        {"filters": ExportFilters(since=datetime(2024, 2, 1), until=datetime(2024, 1, 1))},
        {"formats": ("csv",)},
        {"export_id": "../escape"},
    ],
)
def test_bad_options_raise_and_leave_nothing(world, kwargs):
    settings, db, _ = world
    with pytest.raises(ExportError):
        _run(settings, db, **kwargs)
    assert not settings.exports_dir.exists() or not any(settings.exports_dir.iterdir())


def test_existing_export_id_is_refused_and_cancel_cleans_up(world):
    settings, db, _ = world
    _run(settings, db, export_id="fixed")
    with pytest.raises(ExportError):
        _run(settings, db, export_id="fixed")
    assert (settings.exports_dir / "fixed" / "dialogues.jsonl").is_file()
    with pytest.raises(ExportCancelled):
        export(
            db,
            settings.exports_dir,
            ExportOptions(formats=("jsonl",), export_id="stopped", chunk_size=1),
            cancel=lambda: True,
            env={},
        )
    assert not (settings.exports_dir / "stopped").exists()


def test_resolve_export_file_refuses_traversal(world, tmp_path):
    settings, db, _ = world
    result = _run(settings, db, formats=("jsonl", "parquet"), export_id="safe")
    base = settings.exports_dir
    assert resolve_export_file(base, "safe", "dialogues.jsonl") == result.files["jsonl"].resolve()
    assert resolve_export_file(base, "safe", "messages.parquet").is_file()
    secret = tmp_path / "secret.txt"
    secret.write_text("nope")
    os.symlink(secret, base / "safe" / "link.txt")
    os.symlink(settings.data_dir, base / "linked")
    (base / "safe" / "sub").mkdir()
    bad = [
        ("safe", "../../upc.db"),
        ("safe", "/etc/passwd"),
        ("safe", str(settings.db_path)),
        ("safe", "%2e%2e/upc.db"),
        ("safe", "%2e%2e"),
        ("safe", "dialogues.jsonl\x00.txt"),
        ("safe", ".."),
        ("safe", "..."),
        ("safe", "sub"),
        ("safe", "link.txt"),
        ("safe", "missing.jsonl"),
        ("safe", "sub/../dialogues.jsonl"),
        ("..", "upc.db"),
        ("safe/..", "upc.db"),
        ("linked", "upc.db"),
        ("%2e%2e", "upc.db"),
        ("safe\x00", "dialogues.jsonl"),
        ("", "dialogues.jsonl"),
        ("/proc/self", "environ"),
    ]
    for export_id, filename in bad:
        with pytest.raises(ExportPathError):
            resolve_export_file(base, export_id, filename)


def test_cli_writes_an_export(world, capsys):
    settings, db, _ = world
    db.dispose()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "export",
            "--format",
            "jsonl,parquet",
            "--feedback",
            "liked",
            "--id",
            "cli1",
            "--no-progress",
        ]
    )
    assert args.func(args, settings) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["conversations"] == 1 and summary["scrubbed"]["email"] == 1
    assert (settings.exports_dir / "cli1" / "messages.parquet").is_file()
    bad = parser.parse_args(["export", "--user", "nobody", "--no-progress"])
    assert bad.func(bad, settings) == 2


def test_scrubber_edge_cases():
    scrubber = PiiScrubber()
    counts = ScrubCounts()
    terms = build_user_terms("the_admin", ["has a daughter named Maya"])
    text = "In 2024-05 pi is 3.14159265; Maya and the kids. Call 06 12 34 56 78 or www.x.com."
    out = scrubber.scrub(text, counts, terms)
    assert out == "In 2024-05 pi is 3.14159265; [FACT] and the kids. Call [PHONE] or [URL]."
    assert {k: v for k, v in counts.to_dict().items() if v} == {"phone": 1, "url": 1, "fact": 1}


def test_probe15_cards_ibans_birth_dates_and_other_peoples_names_are_scrubbed():
    scrubber = PiiScrubber()
    counts = ScrubCounts()
    terms = build_user_terms("alice", [])
    text = (
        "alice here: card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, "
        "born on 14 March 1987; met John Miller on 2026-11-30. Order 1234567890123456, "
        "ISBN 978-0-306-40615-7, moved in March 2020."
    )
    out = scrubber.scrub(text, counts, terms)
    assert out == (
        "[NAME] here: card [CARD], IBAN [IBAN], born on [DOB]; met [PERSON] on [DATE]. "
        "Order 1234567890123456, ISBN 978-0-306-40615-7, moved in March 2020."
    )
    assert {k: v for k, v in counts.to_dict().items() if v} == {
        "card": 1, "iban": 1, "dob": 1, "person": 1, "date": 1, "name": 1
    }  # fmt: skip


def test_pii_sample_metrics():
    """Floors under the figures of bench/pii_quality.py (2026-12-01), one text of slack."""
    metrics = evaluate_pii(load_pii_sample())
    for kind in ("card", "iban", "dob", "date", "person"):
        m = metrics[kind]
        assert m.recall >= 0.9, (kind, m.misses)
        assert m.precision >= 0.9, (kind, m.alarms)
