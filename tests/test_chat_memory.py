"""Memory inside the chat flow: cross-conversation recall, deletion, opt-out, degradation,
on SQLite and PostgreSQL, with embedded Chroma and a Chroma server."""

import logging
import shutil
import time

import pytest

from chatbot.accounts import Accounts
from chatbot.chat import ChatService
from chatbot.memory import MemoryService
from core.embeddings import Embedder
from core.local_model import LocalModel
from core.types import GenerationParams
from storage import Database


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = LocalModel(tiny_model_dir, model_id="tiny")
    yield model
    model.close()


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def env(db_url, data_dir, tiny, embedder):
    db = Database(db_url, data_dir=data_dir)
    memory = MemoryService(db, embedder, chroma_path=data_dir / "chroma")
    chat = ChatService(
        db, tiny, params=GenerationParams(max_new_tokens=4, temperature=1.0, seed=1), memory=memory
    )
    accounts = Accounts(db)
    yield db, chat, memory, accounts
    memory.close()
    db.dispose()


def system_prompt(chat, user_id, conversation_id):
    return chat._prompt(user_id, conversation_id)[0].content


def test_facts_from_one_conversation_reach_the_next(env):
    _, chat, memory, accounts = env
    nina = accounts.create("nina", "nina-pass-1")
    first = chat.create_conversation(nina.id)
    list(chat.send(nina.id, first, "I'm a pediatric nurse and I restore old motorbikes."))
    facts = [f.text for f in memory.list_facts(nina.id)]
    assert any("nurse" in f for f in facts) and any("motorbike" in f for f in facts)
    second = chat.create_conversation(nina.id)
    assert "motorbike" in memory.profile(nina.id)
    list(chat.send(nina.id, second, "What should I do this weekend?"))
    prompt = system_prompt(chat, nina.id, second)
    assert "motorbike" in prompt and "nurse" in prompt
    # Another user's prompt never carries nina's facts.
    omar = accounts.create("omar", "omar-pass-1")
    theirs = chat.create_conversation(omar.id)
    list(chat.send(omar.id, theirs, "Hello there."))
    assert "motorbike" not in system_prompt(chat, omar.id, theirs)


def test_deleting_a_fact_stops_its_use_at_once_and_memory_off_stops_all(env):
    _, chat, memory, accounts = env
    pia = accounts.create("pia", "pia-pass-12")
    cid = chat.create_conversation(pia.id)
    list(chat.send(pia.id, cid, "I work as a glassblower and I love sailing."))
    sailing = next(f for f in memory.list_facts(pia.id) if "sailing" in f.text)
    assert memory.delete_fact(pia.id, sailing.id)
    prompt = system_prompt(chat, pia.id, cid)
    assert "sailing" not in prompt and "glassblower" in prompt
    accounts.set_preferences(pia.id, memory_enabled=False)
    assert "glassblower" not in system_prompt(chat, pia.id, cid)
    list(chat.send(pia.id, cid, "I also keep chickens."))
    assert not any("chicken" in f.text for f in memory.list_facts(pia.id))
    accounts.set_preferences(pia.id, memory_enabled=True)
    assert memory.forget_all(pia.id) >= 1
    assert "glassblower" not in system_prompt(chat, pia.id, cid)


def test_chat_survives_a_broken_chroma(env, data_dir):
    _, chat, _memory, accounts = env
    quinn = accounts.create("quinn", "quinn-pass-1")
    cid = chat.create_conversation(quinn.id)
    shutil.rmtree(data_dir / "chroma", ignore_errors=True)
    (data_dir / "chroma").write_text("not a directory any more")
    events = list(chat.send(quinn.id, cid, "I'm a beekeeper."))
    assert events[-1].kind == "done"
    assert chat.messages(quinn.id, cid)[-1].role == "assistant"


def test_a_returning_user_is_greeted_with_a_remembered_fact(env):
    _, chat, _, accounts = env
    lena = accounts.create("lena", "lena-pass-1")
    first = chat.create_conversation(lena.id)
    list(chat.send(lena.id, first, "My name is Lena and I keep bees in my garden."))
    second = chat.create_conversation(lena.id)
    events = list(chat.stream_greeting(lena.id, second))
    assert events[0].kind == "delta" and "Lena" in events[0].text  # the opener streams first
    done = events[-1]
    assert done.kind == "done" and done.text.startswith(events[0].text.strip())
    assert "you keep bees in your garden" in done.text  # second person, from the stored fact
    assert [m.content for m in chat.messages(lena.id, second)] == [done.text]  # as shown
    # Regenerating the greeting recalls too; a new user and memory off get none.
    regenerated = list(chat.regenerate(lena.id, second))[-1]
    assert "bees" in regenerated.text
    omar = accounts.create("omar2", "omar-pass-1")
    theirs = list(chat.stream_greeting(omar.id, chat.create_conversation(omar.id)))[-1]
    assert "bees" not in theirs.text and "Lena" not in theirs.text
    accounts.set_preferences(lena.id, memory_enabled=False)
    third = list(chat.stream_greeting(lena.id, chat.create_conversation(lena.id)))[-1]
    assert "bees" not in third.text and "Lena" not in third.text


def test_chat_goes_on_while_the_chroma_server_is_down(
    db_url, data_dir, tiny, embedder, chroma_server, caplog
):
    db = Database(db_url, data_dir=data_dir)
    memory = MemoryService(
        db,
        embedder,
        chroma_url=chroma_server.url,
        collection_name="chat-outage",
        retry_interval_s=0.2,
        timeout_s=2.0,
    )
    chat = ChatService(db, tiny, params=GenerationParams(max_new_tokens=4, seed=1), memory=memory)
    rae = Accounts(db).create("rae", "rae-pass-12")
    cid = chat.create_conversation(rae.id)
    list(chat.send(rae.id, cid, "I'm a beekeeper."))
    chroma_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="chatbot.memory"):
            events = list(chat.send(rae.id, cid, "I also grow tomatoes."))
            assert events[-1].kind == "done"
            prompt = system_prompt(chat, rae.id, cid)
        assert "memory index (Chroma) failed" in caplog.text
        # Recall runs on the database alone: both facts still reach the prompt.
        assert "beekeeper" in prompt and "tomatoes" in prompt
    finally:
        chroma_server.start()
    deadline = time.monotonic() + 30
    while not memory.index_available() and time.monotonic() < deadline:
        time.sleep(0.1)
    memory.wait_caught_up()
    collection = memory._index()
    stored = {f.id for f in memory.list_facts(rae.id)}
    assert len(stored) == 2 and set(collection.get(where={"user_id": rae.id})["ids"]) == stored
    memory.close()
    db.dispose()
