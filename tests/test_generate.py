"""Algorithm 1 with real (tiny) generation: full per-turn records, lockstep, resume, faults."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.local_model import LocalModel
from core.openai_model import OpenAIModel
from core.settings import load_settings
from core.types import GenerationParams
from learner.cli import register
from learner.critic import CachedCritic, LogitCritic, TextJudgeCritic
from learner.curriculum import compute_stats
from learner.generate import (
    CorpusGenerator,
    GenerationConfig,
    is_apology,
    regeneration_request,
    run_dialogues,
)
from learner.records import Score
from learner.store import CorpusStore
from storage.db import Database


@dataclass(frozen=True)
class Persona:
    id: str
    name: str
    background: str


PERSONAS = [
    Persona("p-ann", "Ann", "Ann is a baker in Leeds who lost her shop and now bakes at home."),
    Persona("p-bob", "Bob", "Bob is an airline pilot who plays chess and keeps bees."),
    Persona("p-cy", "Cy", "Cy is a retired teacher who restores old radios."),
]


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> Iterator:
    """A LocalModel over a tiny randomly initialised Llama with the SmolLM2 tokenizer."""

    lm = LocalModel(tiny_model_dir, device="cpu", model_id="tiny-llama")
    yield lm
    lm.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CorpusStore]:
    settings = load_settings(env={}, data_dir=tmp_path / "data")
    db = Database.from_settings(settings)
    yield CorpusStore(db)
    db.dispose()


def _config(**kw) -> GenerationConfig:
    values = {
        "turns": 3,
        "max_regenerations": 1,
        "chatbot_params": GenerationParams(max_new_tokens=8, temperature=1.0, top_p=1.0),
        "user_params": GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1.0),
        "retry_backoff_s": 0.0,
        "role_retries": 2,
        "seed": 7,
    }
    values.update(kw)
    return GenerationConfig(**values)


class CountingModel:
    """Passes calls to a real model and records the batch size of every call."""

    def __init__(self, inner):
        self.inner = inner
        self.model_id = inner.model_id
        self.batches: list[int] = []

    def generate_batch(self, conversations, params, adapter=None, seeds=None):
        self.batches.append(len(conversations))
        return self.inner.generate_batch(conversations, params, adapter=adapter, seeds=seeds)


class CrashAfter:
    """A real critic that raises (as a killed process would stop) after n calls."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0
        self.model_id, self.prompt_version = inner.model_id, inner.prompt_version

    def score_batch(self, items):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt("simulated crash")
        return self.inner.score_batch(items)


def test_algorithm1_stores_full_turn_records(local, store: CorpusStore) -> None:
    critic = LogitCritic.from_local_model(local)
    config = _config(max_regenerations=2)
    gen = CorpusGenerator(local, local, critic, config, store=store)
    run, resumed = store.open_run(1, split="train", config=config.to_dict(), models=gen.model_ids())
    assert not resumed
    result = gen.run(PERSONAS[:2], run.id)
    stored = store.dialogues(run.id)
    assert [d.status for d in stored] == ["done", "done"]
    for live, saved in zip(result.dialogues, stored, strict=True):
        assert saved.greeting and saved.user_intro
        assert [t.index for t in saved.turns] == [2, 3]
        for turn in saved.turns:
            assert turn.first_score.scored and turn.final_score.scored
            assert turn.first_score.distribution is not None
            assert turn.user_message and turn.user_answer
            assert 0 <= turn.regenerations <= 2
            # A random model's judge is unsure (~3): every reply fails 4 and is regenerated.
            assert turn.regenerations == 2
            assert turn.final_reply
            # Best-of-2 then critique-guided regenerations, every attempt recorded.
            kinds = [a.kind for a in turn.attempts]
            assert kinds[:2] == ["first", "resample"] and set(kinds[2:]) <= {"regen"}
            assert turn.attempts[0].reply == turn.first_reply
            usable = [a for a in turn.attempts if a.usable]
            if usable:
                best = max(a.score.mean() for a in usable)
                assert turn.final_score.mean() == pytest.approx(best)
                assert any(a.reply == turn.final_reply for a in usable)
            assert all(a.finish_reason in ("stop", "length") for a in turn.attempts)
        assert saved.tokens.chatbot > 0 and saved.tokens.user > 0 and saved.tokens.critic > 0
        assert saved.tokens == live.tokens
        assert saved.chatbot_model_id == "tiny-llama"
        assert saved.critic_model_id == "llm-logit:tiny-llama"
        assert set(saved.prompt_versions) >= {"chatbot_system", "regenerate", "user", "critic"}
    # The second turn's user message is the first turn's stored user answer.
    d = stored[0]
    assert d.turns[1].user_message == d.turns[0].user_answer
    assert d.turns[0].user_message == d.user_intro


def test_lockstep_one_batched_call_per_step(local) -> None:
    counting = CountingModel(local)
    critic = LogitCritic.from_local_model(local)
    dialogues = run_dialogues(counting, counting, critic, PERSONAS, turns=3, seed=1)
    assert all(d.status == "done" for d in dialogues)
    assert all(len(d.turns) == 2 for d in dialogues)
    for d in dialogues:
        for t in d.turns:
            assert t.regenerations == 0 and t.final_reply == t.first_reply
    # greeting, intro, then per turn a reply and a user answer: all three users per call.
    assert counting.batches[:2] == [3, 3]
    assert sum(counting.batches) >= 3 * 6
    assert max(counting.batches) == 3
    assert len(counting.batches) <= 6 + 3  # + a few retries of empty user answers at most


def test_resume_after_crash_redoes_nothing(local, store: CorpusStore) -> None:
    config = _config(max_regenerations=0, batch_size=2, best_of_n=1)
    critic = LogitCritic.from_local_model(local)
    crashing = CrashAfter(critic, n=3)
    gen = CorpusGenerator(local, local, crashing, config, store=store)
    run, _ = store.open_run(1, split="train", config=config.to_dict(), models=gen.model_ids())
    with pytest.raises(KeyboardInterrupt):
        gen.run(PERSONAS, run.id)
    before = {d.persona_id: d for d in store.dialogues(run.id)}
    # Chunk 1 (Ann, Bob) finished with 2 critic calls; Cy was part-way when it crashed.
    assert before["p-ann"].status == "done" and before["p-bob"].status == "done"
    assert before["p-cy"].status == "running"
    assert len(before["p-cy"].turns) == 1

    counted = CountingModel(local)
    gen2 = CorpusGenerator(counted, counted, CachedCritic(critic), config, store=store)
    run2, resumed = store.open_run(1, split="train", config={}, models={})
    assert resumed and run2.id == run.id
    result = gen2.run(PERSONAS, run.id)
    assert result.skipped == 2
    after = {d.persona_id: d for d in store.dialogues(run.id)}
    for pid in ("p-ann", "p-bob"):
        assert after[pid].turns == before[pid].turns
        assert after[pid].id == before[pid].id
    cy = after["p-cy"]
    assert cy.status == "done" and cy.id == before["p-cy"].id
    assert [t.index for t in cy.turns] == [2, 3]
    assert cy.turns[0] == before["p-cy"].turns[0]
    # Only Cy's remaining turn was generated: one reply and one user answer (+ retries).
    assert counted.batches and all(b == 1 for b in counted.batches)
    assert len(counted.batches) <= 4


def test_regeneration_request_and_apology() -> None:
    score = Score(rel=2, int=4, val=1, reasons={"rel": "ignores her job", "val": "empty"})
    text = regeneration_request(score, 4, "I bake bread")
    assert "ignores her job" in text and "empty" in text and "I bake bread" in text
    assert "interest (" not in text
    assert is_apology("I'm sorry, let me try again.")
    assert is_apology("Sorry! Here is a better answer")
    assert is_apology("My apologies for that.")
    assert not is_apology("Sourdough needs a long, cold proof.")


# --------------------------------------------------------------- faults (real HTTP)
class _Server:
    """A tiny OpenAI-compatible endpoint whose answer is chosen per request."""

    def __init__(self, policy: Callable[[dict], tuple[int, str]]):
        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                status, content = policy(body)
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "m"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                }
                data = json.dumps(payload if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _openai(base_url: str):
    return OpenAIModel(base_url, "judge", max_retries=0, concurrency=4)


def test_failing_user_endpoint_fails_only_that_dialogue(local, store: CorpusStore) -> None:
    def policy(body: dict) -> tuple[int, str]:
        if "Bob" in body["messages"][0]["content"]:
            return 500, "internal error"
        return 200, "Nice to meet you, I love my work."

    server = _Server(policy)
    try:
        user = _openai(server.base_url)
        config = _config(max_regenerations=0)
        gen = CorpusGenerator(local, user, LogitCritic.from_local_model(local), config, store=store)
        run, _ = store.open_run(1, split="train", config={}, models=gen.model_ids())
        gen.run(PERSONAS, run.id)
    finally:
        server.close()
    stored = {d.persona_id: d for d in store.dialogues(run.id)}
    assert stored["p-bob"].status == "failed"
    assert stored["p-bob"].cause.startswith("user:")
    assert stored["p-ann"].status == "done" and stored["p-cy"].status == "done"
    stats = compute_stats(list(stored.values()), 1)
    assert stats.failed == 1 and stats.done == 2
    assert stats.failure_causes == {"user": 1}


def test_critic_500s_and_garbage(local, store: CorpusStore) -> None:
    """500s from the judge fail the dialogue; garbage leaves the turn unscored."""
    bad = _Server(lambda body: (500, "boom"))
    garbage = _Server(lambda body: (200, "I think it is lovely!!"))
    try:
        config = _config(max_regenerations=1, batch_size=3)
        gen = CorpusGenerator(
            local, local, TextJudgeCritic(_openai(bad.base_url)), config, store=store
        )
        run, _ = store.open_run(1, split="train", config={}, models=gen.model_ids())
        gen.run(PERSONAS[:2], run.id)
        failed = store.dialogues(run.id)
        assert [d.status for d in failed] == ["failed", "failed"]
        assert all(d.cause.startswith("critic:") for d in failed)
        # bounded: 2 batch attempts of 4 items (2 candidates each), then 2 per dialogue
        # alone; a failed dialogue's second candidate is never sent.
        assert bad.requests == 2 * 4 + 2 * 2

        gen2 = CorpusGenerator(
            local, local, TextJudgeCritic(_openai(garbage.base_url)), config, store=store
        )
        run2, _ = store.open_run(2, split="train", config={}, models=gen2.model_ids())
        gen2.run(PERSONAS[:1], run2.id)
    finally:
        bad.close()
        garbage.close()
    (dialogue,) = store.dialogues(run2.id)
    assert dialogue.status == "done"
    for turn in dialogue.turns:
        assert not turn.first_score.scored
        assert "lovely" in turn.first_score.raw
        assert turn.regenerations == 0  # never regenerate on an invented score
    assert compute_stats([dialogue], 2).unscored == 2
    assert garbage.requests == 2 * 2 * 4  # two turns x two candidates x (1 ask + 3 re-asks)


@pytest.mark.slow
def test_against_running_app_openai_endpoint(request, local) -> None:
    """The app's own /v1/chat/completions as critic and user, through the openai backend."""
    try:
        app = request.getfixturevalue("running_app")
    except pytest.FixtureLookupError:
        pytest.skip("the running_app fixture is not defined yet")

    remote = OpenAIModel(f"{app.base_url}/v1", "upc", api_key=app.api_key, max_retries=1)
    critic = TextJudgeCritic(remote, max_reasks=1, max_new_tokens=40)
    dialogues = run_dialogues(local, remote, critic, PERSONAS[:1], turns=2)
    assert all(d.status == "done" for d in dialogues)
    for d in dialogues:
        assert d.user_intro and d.turns and d.turns[0].user_answer
        assert d.tokens.user > 0 and d.tokens.critic > 0
        score = d.turns[0].first_score
        # The embedded judge either parsed (valid 1-5 scores) or is recorded unscored.
        assert score.scored or (score.raw and score.attempts == 2)
        assert not score.scored or all(1 <= score.get(k) <= 5 for k in ("rel", "int", "val"))


@pytest.mark.slow
def test_cli_generate_resume_and_select(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import argparse

    settings = load_settings(
        env={},
        data_dir=tmp_path / "data",
        chatbot__model=str(tiny_model_dir),
        user_sim__model=str(tiny_model_dir),
        critic__model=str(tiny_model_dir),
        chatbot__device="cpu",
        user_sim__device="cpu",
        critic__device="cpu",
        learner__critic="llm",
        learner__max_regenerations=1,
        generation__max_new_tokens=8,
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="group"))
    argv = ["learn", "generate", "--users", "2", "--turns", "2", "--no-progress", "--seed", "3"]
    args = parser.parse_args(argv)
    assert args.func(args, settings) == 0
    out = capsys.readouterr().out
    assert "iteration 1: 2 done, 0 failed" in out and "regenerations / reply" in out
    # Rerunning the finished iteration redoes nothing.
    args = parser.parse_args([*argv, "--iteration", "1"])
    assert args.func(args, settings) == 0
    assert "2 dialogues were already finished" in capsys.readouterr().out
    args = parser.parse_args(["learn", "select", "--iteration", "1"])
    assert args.func(args, settings) == 0
    assert (settings.runs_dir / "iter-001" / "selection.json").exists()


def test_a_dialogue_is_the_same_whichever_users_share_its_batch(local) -> None:
    """Row seeds come from the run seed and the dialogue itself, so splitting the users
    (across chunks here, across GPUs in a data-parallel run) gives the same corpus."""
    critic = LogitCritic.from_local_model(local)
    config = _config(best_of_n=2, max_regenerations=1)

    def texts(dialogues):
        return {
            d.persona_id: (
                d.greeting,
                d.user_intro,
                [(t.final_reply, t.user_answer, [a.reply for a in t.attempts]) for t in d.turns],
            )
            for d in dialogues
        }

    together = CorpusGenerator(local, local, critic, config).run(PERSONAS).dialogues
    apart = [
        d
        for part in ([PERSONAS[1]], [PERSONAS[2], PERSONAS[0]])
        for d in CorpusGenerator(local, local, critic, config).run(part).dialogues
    ]
    assert texts(together) == texts(apart)
    assert all(d.status == "done" and d.turns for d in together)
    # Two copies of one user (evaluation seeds) are different samples.
    twice = CorpusGenerator(local, local, critic, config).run([PERSONAS[0]] * 2).dialogues
    assert texts([twice[0]]) == texts([together[0]])
    assert twice[0].greeting != twice[1].greeting or twice[0].turns[0].final_reply != (
        twice[1].turns[0].final_reply
    )
