import pytest
from sqlalchemy import select

from chatbot.accounts import AccountError, Accounts
from chatbot.chat import ChatService, NotFoundError
from core.local_model import LocalModel
from core.types import GenerationParams
from core.validation import InputError
from storage import Database
from storage.models import Feedback, Message


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = LocalModel(tiny_model_dir, model_id="tiny")
    yield model
    model.close()


@pytest.fixture
def env(db_url, data_dir, tiny):
    db = Database(db_url, data_dir=data_dir)
    accounts = Accounts(db)
    chat = ChatService(
        db, tiny, params=GenerationParams(max_new_tokens=8, temperature=1.0, seed=11)
    )
    alice = accounts.create("alice", "password-a")
    bob = accounts.create("bob", "password-b")
    yield db, chat, alice, bob
    db.dispose()


def drain(events):
    return list(events)


def test_bot_greets_first_then_turns_are_stored_in_order(env):
    db, chat, alice, _ = env
    cid = chat.create_conversation(alice.id)
    greeting = drain(chat.stream_greeting(alice.id, cid))
    assert greeting[-1].kind == "done" and greeting[-1].message_id, greeting[-1]
    events = chat.send(alice.id, cid, "I'm a pediatric nurse.")
    # The user's message is committed before generation starts.
    with db.session() as s:
        stored = s.scalars(select(Message).where(Message.conversation_id == cid)).all()
        assert [m.role for m in stored] == ["assistant", "user"]
    drain(events)
    msgs = chat.messages(alice.id, cid)
    assert [m.role for m in msgs] == ["assistant", "user", "assistant"]
    assert msgs[1].content == "I'm a pediatric nurse."
    with db.session() as s:
        bot = s.get(Message, msgs[2].id)
        assert bot.model_id == "tiny" and bot.adapter_id == "base"
        assert (
            bot.completion_tokens and bot.latency_ms > 0 and bot.gen_params["max_new_tokens"] == 8
        )
    assert chat.list_conversations(alice.id)[0].title == "I'm a pediatric nurse."


def test_bad_input_stores_nothing(env):
    _, chat, alice, _ = env
    cid = chat.create_conversation(alice.id)
    for bad in ["", "   ", "x" * 4001, "a\x00b"]:
        with pytest.raises(InputError):
            chat.send(alice.id, cid, bad)
    assert chat.messages(alice.id, cid) == []


def test_timeout_mid_reply_is_stored_as_interrupted(env, tiny):
    db, _, alice, _ = env
    slow = ChatService(
        db, tiny, params=GenerationParams(max_new_tokens=50, temperature=1.0, seed=3, timeout_s=0.0)
    )
    cid = slow.create_conversation(alice.id)
    events = drain(slow.send(alice.id, cid, "Tell me something long."))
    assert events[-1].kind == "error" and events[-1].status == "interrupted"
    msgs = slow.messages(alice.id, cid)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].status == "interrupted" and msgs[1].content


def test_client_going_away_stores_partial_reply(env, tiny):
    db, _, alice, _ = env
    chat = ChatService(
        db, tiny, params=GenerationParams(max_new_tokens=40, temperature=1.0, seed=5)
    )
    cid = chat.create_conversation(alice.id)
    events = chat.send(alice.id, cid, "hello")
    first = next(events)
    assert first.kind == "delta"
    events.close()  # the browser tab closed mid-stream
    msgs = chat.messages(alice.id, cid)
    assert msgs[-1].role == "assistant" and msgs[-1].status == "interrupted"


def test_regenerate_supersedes_the_last_reply(env):
    db, chat, alice, _ = env
    cid = chat.create_conversation(alice.id)
    drain(chat.send(alice.id, cid, "hi"))
    old = chat.messages(alice.id, cid)[-1]
    drain(chat.regenerate(alice.id, cid))
    msgs = chat.messages(alice.id, cid)
    assert len(msgs) == 2 and msgs[-1].id != old.id
    with db.session() as s:
        assert s.get(Message, old.id).status == "superseded"


def test_feedback_like_dislike_with_reason_and_update(env):
    db, chat, alice, bob = env
    cid = chat.create_conversation(alice.id)
    drain(chat.send(alice.id, cid, "hi"))
    reply = chat.messages(alice.id, cid)[-1]
    chat.rate(alice.id, reply.id, 1)
    chat.rate(alice.id, reply.id, -1, "Too generic")
    with db.session() as s:
        rows = s.scalars(select(Feedback)).all()
        assert [(r.rating, r.reason) for r in rows] == [(-1, "Too generic")]
    assert chat.messages(alice.id, cid)[-1].rating == -1
    with pytest.raises(NotFoundError):
        chat.rate(bob.id, reply.id, 1)


def test_users_never_see_each_others_conversations(env):
    _, chat, alice, bob = env
    cid = chat.create_conversation(alice.id)
    drain(chat.send(alice.id, cid, "secret-canary-42"))
    assert chat.list_conversations(bob.id) == []
    for call in (
        lambda: chat.messages(bob.id, cid),
        lambda: chat.send(bob.id, cid, "hi"),
        lambda: chat.regenerate(bob.id, cid),
        lambda: chat.delete_conversation(bob.id, cid),
        lambda: chat.messages("", cid),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert any("secret-canary-42" in m.content for m in chat.messages(alice.id, cid))


def test_everything_survives_a_restart(db_url, data_dir, tiny):
    db = Database(db_url, data_dir=data_dir)
    accounts = Accounts(db)
    chat = ChatService(db, tiny, params=GenerationParams(max_new_tokens=4, temperature=1.0, seed=2))
    carol = accounts.create("carol", "password-c")
    cid = chat.create_conversation(carol.id)
    drain(chat.send(carol.id, cid, "remember me"))
    db.dispose()
    db2 = Database(db_url, data_dir=data_dir)
    accounts2 = Accounts(db2)
    assert accounts2.verify("carol", "password-c") is not None
    assert accounts2.verify("carol", "wrong-password") is None
    chat2 = ChatService(db2, tiny, params=GenerationParams(max_new_tokens=4))
    assert chat2.messages(carol.id, cid)[0].content == "remember me"


def test_account_rules(env):
    db, _, _, _ = env
    accounts = Accounts(db)
    with pytest.raises(AccountError, match="taken"):
        accounts.create("alice", "another-password")
    with pytest.raises(AccountError, match="8 characters"):
        accounts.create("dave", "short")
    with pytest.raises(AccountError):
        accounts.create("anon-sneaky", "password-x")
    token, a1 = accounts.issue_anonymous()
    assert accounts.anonymous(token).id == a1.id
    assert token not in a1.username  # the name shows nothing of the browser's secret
    with pytest.raises(AccountError):
        accounts.anonymous("short")
    with pytest.raises(AccountError):  # only secrets the server issued name a user
        accounts.anonymous("browser-id-0123456789abcdef")


def test_concurrent_sends_to_one_conversation_all_land(env):
    import threading

    _, chat, alice, _ = env
    cid = chat.create_conversation(alice.id)
    errors = []

    def send(i):
        try:
            list(chat.send(alice.id, cid, f"message {i}"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    msgs = chat.messages(alice.id, cid)
    assert sorted(m.content for m in msgs if m.role == "user") == sorted(
        f"message {i}" for i in range(8)
    )
    assert [m.seq for m in msgs] == sorted(m.seq for m in msgs)
    assert len({m.seq for m in msgs}) == len(msgs) == 16
