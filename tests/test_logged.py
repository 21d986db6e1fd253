"""Learning from logged real dialogues: picking, critique with provenance, regeneration,
idempotency and the mix into training files (tiny random model as critic and chatbot)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from core.local_model import LocalModel
from learner.critic import LogitCritic
from learner.curriculum import load_training_set
from learner.logged import LoggedConfig, LoggedLearner, load_salt, pending_count, user_hash
from learner.logged_export import build_logged_training_set, mix_counts, mix_into_training_set
from learner.records import Score
from storage.db import Database
from storage.logged_models import LoggedTurnRow
from storage.models import Conversation, Message, User, utcnow

DIALOGUE = [
    ("assistant", "Hello! What kept you busy this week?"),
    ("user", "I work as a nurse and the night shifts were rough."),
    ("assistant", "Night shifts are hard on sleep. Which ward do you work on?"),
    ("user", "Paediatrics. I also grow tomatoes on my balcony."),
    ("assistant", "Balcony tomatoes need lots of sun; which variety do you grow?"),
]


def seed_conversation(
    db: Database,
    username: str,
    turns=DIALOGUE,
    *,
    idle_minutes: float = 120,
    opt_in: bool = True,
    user_id: str | None = None,
) -> tuple[str, str]:
    """A stored conversation whose last message is `idle_minutes` old; returns (user, conv)."""
    when = utcnow() - timedelta(minutes=idle_minutes)
    with db.session() as s:
        user = s.scalar(select(User).where(User.username == username))
        if user is None:
            user = User(username=username, learning_opt_in=opt_in)
            if user_id:
                user.id = user_id
            s.add(user)
            s.flush()
        conv = Conversation(user_id=user.id, created_at=when, updated_at=when)
        s.add(conv)
        s.flush()
        for seq, (role, content) in enumerate(turns):
            s.add(
                Message(
                    conversation_id=conv.id,
                    seq=seq,
                    role=role,
                    content=content,
                    created_at=when + timedelta(seconds=seq),
                )
            )
        return user.id, conv.id


@pytest.fixture(scope="module")
def tiny_local(tiny_model_dir):
    model = LocalModel(tiny_model_dir, model_id="tiny", device="cpu", dtype="float32")
    yield model
    model.close()


@pytest.fixture
def db(data_dir) -> Database:
    database = Database(f"sqlite:///{data_dir / 'upc.db'}", data_dir=data_dir)
    yield database
    database.dispose()


def test_mix_counts_keeps_the_ratio():
    assert mix_counts(100, 500, 0.5) == (100, 100)
    assert mix_counts(100, 20, 0.5) == (20, 20)
    assert mix_counts(30, 100, 0.25) == (30, 10)
    assert mix_counts(0, 7, 0.5) == (0, 7)  # no synthetic corpus: real data alone
    assert mix_counts(10, 7, 0.0) == (10, 0)


def test_pipeline_on_stored_conversations(db, data_dir, tiny_local):
    nurse, conv = seed_conversation(db, "nurse")
    _, opted_out = seed_conversation(db, "private-person", opt_in=False)
    _, fresh = seed_conversation(db, "still-chatting", idle_minutes=1)
    profiles = {nurse: "- The user works as a paediatric nurse.\n- The user grows tomatoes."}
    learner = LoggedLearner(
        db,
        LogitCritic.from_local_model(tiny_local),
        tiny_local,
        salt=load_salt(data_dir),
        config=LoggedConfig(idle_minutes=30, accept_threshold=5, max_regenerations=1),
        profile=lambda uid: profiles.get(uid, ""),
    )
    assert learner.candidates() == [conv]  # opted-out and still-active conversations skipped
    counts = learner.run()
    assert counts.conversations == 1 and counts.turns == 2
    with db.session() as s:
        rows = s.scalars(select(LoggedTurnRow).order_by(LoggedTurnRow.seq)).all()
    assert [r.seq for r in rows] == [2, 4]  # the greeting is not scored
    for row in rows:
        assert row.conversation_id == conv
        assert row.user_hash == user_hash(nurse, load_salt(data_dir)) != nurse
        assert row.critic_model_id == "llm-logit:tiny"
        assert row.background_source == "memory"
        assert Score.from_dict(row.original_score).scored
        assert row.prefix[-1]["role"] == "user"
        # accept_threshold 5 cannot be met by expected scores of a random model: regenerated
        assert row.regenerations == 1
        if row.regenerated is not None:
            assert Score.from_dict(row.regenerated_score).scored
            assert row.chatbot_model_id == "tiny"
    # Idempotent: nothing is critiqued twice.
    assert learner.candidates() == []
    assert learner.run().turns == 0
    assert opted_out and fresh


def test_background_falls_back_to_conversation(db, data_dir, tiny_local):
    seed_conversation(db, "no-memory")
    learner = LoggedLearner(
        db,
        LogitCritic.from_local_model(tiny_local),
        None,
        salt="s",
        config=LoggedConfig(idle_minutes=30, accept_threshold=1),
        profile=lambda _uid: "",
    )
    learner.run()
    with db.session() as s:
        rows = s.scalars(select(LoggedTurnRow)).all()
    assert rows and all(r.background_source == "conversation" for r in rows)
    assert all(r.status == "accepted" and r.regenerations == 0 for r in rows)


def test_export_mix_provenance_and_no_duplicates(db, data_dir, tiny_local):
    for name in ("a", "b", "c"):
        seed_conversation(db, name)
    learner = LoggedLearner(
        db,
        LogitCritic.from_local_model(tiny_local),
        None,
        salt=load_salt(data_dir),
        config=LoggedConfig(idle_minutes=30, accept_threshold=1),
    )
    learner.run()
    assert pending_count(db) == 6
    runs = data_dir / "runs"
    it1 = runs / "iter-001"
    it1.mkdir(parents=True)
    synthetic = [
        {
            "dialogue_id": f"syn{i}",
            "persona_id": "p",
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": f"hi {i}"},
            ],
        }
        for i in range(4)
    ]
    (it1 / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic))
    (it1 / "pairs.jsonl").write_text("")
    (it1 / "selection.json").write_text(json.dumps({"iteration": 1, "ids_sha256": ""}))
    mix = mix_into_training_set(db, it1, 1, ratio=0.5, system_prompt="SYS")
    assert (mix.synthetic, mix.real) == (4, 4)
    again = mix_into_training_set(db, it1, 1, ratio=0.5, system_prompt="SYS")
    assert again.turn_ids == mix.turn_ids  # re-running a selection is idempotent
    rows = [json.loads(x) for x in (it1 / "sft.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("source") == "logged"]
    assert len(rows) == 8 and len(logged) == 4
    for r in logged:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][0]["content"] == "SYS"
        assert r["conversation_id"] and len(r["user_hash"]) == 32
        assert r["critic_model_id"] == "llm-logit:tiny"
    assert load_training_set(runs, 1).sft  # ids hash stays consistent
    assert pending_count(db) == 2
    # A retrain takes the rest; nothing already exported is exported again.
    retrain = build_logged_training_set(db, runs, 2, ratio=0.5, system_prompt="SYS")
    assert retrain.real == 2 and not set(retrain.turn_ids) & set(mix.turn_ids)
    assert retrain.synthetic == 2
    assert pending_count(db) == 0
