"""Algorithm 1: critic-guided dialogue corpus generation, all dialogues advanced in lockstep.

Every step (greeting, self-introduction, reply, critique, regeneration, user answer) is one
``generate_batch`` call over all active dialogues of a chunk, so the local backend decodes
them in one left-padded batch and the OpenAI backend sends them with bounded concurrency.
Each turn starts with the first attempt plus ``best_of_n - 1`` plain resamples under the
serving prompt; while the best one fails the accept threshold the chatbot regenerates from
the critic's reasons. Every candidate is recorded with its scores and reply checks, and the
dialogue continues with the best-scoring usable one (never text about the feedback, with
placeholders, a role flip or cut off mid-sentence).
With a ``CorpusStore`` each finished turn is written at once; a rerun of the same iteration
skips finished dialogues and continues part-way ones from their last stored turn.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from core.prompting import load_prompt
from core.types import ChatMessage, ChatModel, Completion, GenerationParams, ModelError
from learner.attempts import (
    clean_text,
    finished_text,
    is_apology,
    keep_best,
    regeneration_request,
)
from learner.critic import Critic
from learner.records import Attempt, CriticInput, DialogueRecord, PersonaLike, Score, TurnRecord
from learner.reply_checks import check_reply, repeats_itself
from learner.simulated_user import clean_user_text, user_messages, user_prompt_version

if TYPE_CHECKING:
    from learner.store import CorpusStore

__all__ = [
    "CorpusGenerator",
    "GenerationConfig",
    "RunResult",
    "is_apology",
    "regeneration_request",
    "run_dialogues",
]

log = logging.getLogger(__name__)

_RETRYABLE = (ModelError, TimeoutError, ConnectionError, OSError)
Progress = Callable[[str, int], None]


@dataclass
class GenerationConfig:
    turns: int = 5
    max_regenerations: int = 3
    accept_threshold: int = 4
    # Candidates per turn before any critique: the first attempt plus n-1 plain resamples.
    best_of_n: int = 2
    batch_size: int = 16
    max_apology_retries: int = 3
    # Bounded retries of a role call that raises (timeouts, 500s, connection errors).
    role_retries: int = 3
    retry_backoff_s: float = 0.5
    chatbot_params: GenerationParams = field(default_factory=GenerationParams)
    user_params: GenerationParams = field(
        default_factory=lambda: GenerationParams(max_new_tokens=64, temperature=0.8)
    )
    adapter: str | None = None
    # Sampling seed (None: unseeded). Each row's seed is derived from this seed, the user,
    # which copy of the user it is, and the dialogue's state, so a dialogue comes out the
    # same whichever other dialogues share its batch (or its GPU).
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    dialogues: list[DialogueRecord]
    skipped: int = 0  # already finished before this call (resume)
    elapsed_s: float = 0.0

    @property
    def failed(self) -> list[DialogueRecord]:
        return [d for d in self.dialogues if d.status == "failed"]


class _Failed(Exception):
    """One dialogue's role call failed for good."""


@dataclass
class _Live:
    persona: PersonaLike
    record: DialogueRecord
    replica: int = 0  # which copy of this user in the run (evaluation seeds)
    # Generation calls so far per dialogue state (history length): part of the row seeds.
    calls: Counter[int] = field(default_factory=Counter)

    @property
    def active(self) -> bool:
        return self.record.status == "running"

    def history(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.record.greeting:
            out.append(("assistant", self.record.greeting))
        if self.record.user_intro:
            out.append(("user", self.record.user_intro))
        for turn in self.record.turns:
            out.append(("assistant", turn.final_reply))
            out.append(("user", turn.user_answer))
        return out

    def next_turn(self) -> int:
        return len(self.record.turns) + 2


class CorpusGenerator:
    def __init__(
        self,
        chatbot: ChatModel,
        user_model: ChatModel,
        critic: Critic,
        config: GenerationConfig | None = None,
        *,
        store: CorpusStore | None = None,
        progress: Progress | None = None,
    ):
        self.chatbot = chatbot
        self.user_model = user_model
        self.critic = critic
        self.config = config or GenerationConfig()
        self.store = store
        self.progress = progress or (lambda _kind, _n: None)
        self.system_prompt = load_prompt("upc_system")
        self.greeting_prompt = load_prompt("upc_greeting")

    @property
    def prompt_versions(self) -> dict[str, str]:
        return {
            "chatbot_system": self.system_prompt.version,
            "chatbot_greeting": self.greeting_prompt.version,
            "regenerate": load_prompt("regenerate", "learner").version,
            "user": user_prompt_version(),
            "critic": self.critic.prompt_version,
        }

    def model_ids(self) -> dict[str, Any]:
        return {
            "chatbot_model_id": self.chatbot.model_id,
            "user_model_id": self.user_model.model_id,
            "critic_model_id": self.critic.model_id,
            "adapter": self.config.adapter,
        }

    # ------------------------------------------------------------------ entry
    def run(
        self,
        personas: Sequence[PersonaLike],
        run_id: str | None = None,
        only: Sequence[int] | None = None,
    ) -> RunResult:
        """Generate (or resume) one dialogue per persona; a store needs ``run_id``.

        ``only`` limits the work to those positions of ``personas`` (one rank's share in a
        data-parallel run); copies of a user are still counted over the whole list, so the
        seeds match a run over all of it."""
        if self.store is not None and run_id is None:
            raise ValueError("a run_id is needed to store the run")
        started = time.perf_counter()
        lives: list[_Live] = []
        skipped = 0
        copies: Counter[str] = Counter()
        mine = set(range(len(personas)) if only is None else only)
        for position, persona in enumerate(personas):
            replica = copies[persona.id]
            copies[persona.id] += 1
            if position not in mine:
                continue
            record = DialogueRecord(
                id=uuid.uuid4().hex,
                persona_id=persona.id,
                persona_name=persona.name,
                prompt_versions=self.prompt_versions,
                **self.model_ids(),
            )
            if self.store is not None:
                record = self.store.begin_dialogue(run_id, position, record)
            if record.status != "running":
                skipped += 1
            lives.append(_Live(persona, record, replica=replica))
        todo = [live for live in lives if live.active]
        size = max(1, self.config.batch_size)
        for start in range(0, len(todo), size):
            self._run_chunk(todo[start : start + size])
        return RunResult([live.record for live in lives], skipped, time.perf_counter() - started)

    # ------------------------------------------------------------- lockstep
    def _run_chunk(self, chunk: list[_Live]) -> None:
        while True:
            alive = [live for live in chunk if live.active]
            for live in alive:
                if live.record.user_intro and live.next_turn() > self.config.turns:
                    live.record.status = "done"
                    self._finish(live)
            alive = [live for live in alive if live.active]
            if not alive:
                return
            greet = [live for live in alive if not live.record.greeting]
            if greet:
                self._greet(greet)
                continue
            intro = [live for live in alive if not live.record.user_intro]
            if intro:
                self._introduce(intro)
                continue
            self._turn(alive)

    def _greet(self, lives: list[_Live]) -> None:
        convs = [
            [
                ChatMessage("system", str(self.system_prompt)),
                ChatMessage("user", str(self.greeting_prompt)),
            ]
            for _ in lives
        ]
        for live, completion in self._generate("chatbot", lives, convs):
            text = clean_text(completion.text)
            if not text:
                self._fail(live, "chatbot: empty greeting")
                continue
            live.record.greeting = text

    def _introduce(self, lives: list[_Live]) -> None:
        texts = self._user_answers(lives, first_turn=True)
        for live, text in texts:
            live.record.user_intro = text
            if self.store is not None:
                self.store.save_opening(live.record)
            self.progress("turn", 1)

    def _turn(self, lives: list[_Live]) -> None:
        cfg = self.config
        histories = {id(live): live.history() for live in lives}
        # The first attempt and n-1 plain resamples under the serving prompt, in one batch.
        n = max(1, cfg.best_of_n)
        rows = [live for live in lives for _ in range(n)]
        convs = [self._chat_messages(histories[id(live)]) for live in rows]
        made = self._generate("chatbot", rows, convs)
        candidates: list[tuple[_Live, str, str, str]] = []
        seen: dict[int, int] = {}
        for live, completion in made:
            kind = "first" if seen.get(id(live), 0) == 0 else "resample"
            seen[id(live)] = seen.get(id(live), 0) + 1
            candidates.append((live, kind, *finished_text(completion)))
        turns: dict[int, TurnRecord] = {}
        for (live, kind, reply, finish), score in zip(
            candidates, self._score_all([(c[0], c[2]) for c in candidates], histories), strict=True
        ):
            if score is None or not live.active:
                continue
            attempt = self._attempt(live, kind, reply, finish, score, histories)
            turn = turns.get(id(live))
            if turn is None:
                turn = turns[id(live)] = TurnRecord(
                    index=live.next_turn(),
                    user_message=histories[id(live)][-1][1],
                    first_reply=reply,
                    first_score=score,
                    final_reply=reply,
                    final_score=score,
                    final_finish_reason=finish,
                )
            turn.attempts.append(attempt)
            keep_best(turn)
        while True:
            need = [
                live
                for live in lives
                if live.active
                and id(live) in turns
                and turns[id(live)].final_score.failing(cfg.accept_threshold)
                and turns[id(live)].regenerations < cfg.max_regenerations
            ]
            if not need:
                break
            self._regenerate(need, turns, histories)
        done = [live for live in lives if live.active and id(live) in turns]
        for live in done:
            histories[id(live)].append(("assistant", turns[id(live)].final_reply))
        answers = self._user_answers(done, first_turn=False, histories=histories)
        for live, text in answers:
            turn = turns[id(live)]
            turn.user_answer = text
            live.record.turns.append(turn)
            if self.store is not None:
                self.store.save_turn(live.record, turn, cfg.accept_threshold)
            self.progress("turn", 1)

    def _attempt(
        self,
        live: _Live,
        kind: str,
        reply: str,
        finish: str,
        score: Score,
        histories: dict[int, list[tuple[str, str]]],
    ) -> Attempt:
        flags = check_reply(
            reply,
            history=histories[id(live)],
            background=live.persona.background,
            user_name=live.persona.name,
            finish_reason=finish,
        )
        # Feedback talk, placeholders, role flips, cut-off text and replies that copy the
        # bot's own earlier turns are never candidates.
        kinds = flags.kinds()
        if repeats_itself(reply, histories[id(live)]):
            kinds = (*kinds, "self_repeat")
        usable = (
            score.scored
            and not flags.unusable
            and "self_repeat" not in kinds
            and not is_apology(reply)
        )
        return Attempt(kind, reply, score, finish, kinds, usable)

    def _regenerate(
        self,
        lives: list[_Live],
        turns: dict[int, TurnRecord],
        histories: dict[int, list[tuple[str, str]]],
    ) -> None:
        """One critique-guided regeneration per turn, built on the best attempt so far."""
        cfg = self.config
        convs = {}
        for live in lives:
            turn = turns[id(live)]
            request = regeneration_request(
                turn.final_score, cfg.accept_threshold, turn.user_message
            )
            convs[id(live)] = [
                *self._chat_messages(histories[id(live)]),
                ChatMessage("assistant", turn.final_reply),
                ChatMessage("user", request),
            ]
        made: dict[int, tuple[str, str]] = {}
        pending = list(lives)
        for attempt in range(cfg.max_apology_retries + 1):
            if not pending:
                break
            results = self._generate("chatbot", pending, [convs[id(x)] for x in pending])
            still = []
            for live, completion in results:
                text, finish = finished_text(completion)
                if text and not is_apology(text):
                    made[id(live)] = (text, finish)
                    continue
                if attempt < cfg.max_apology_retries:
                    turns[id(live)].apology_retries += 1
                    still.append(live)
            pending = still
        for live in lives:
            if live.active:
                turns[id(live)].regenerations += 1
                self.progress("regeneration", 1)
        # A regeneration that kept apologising is dropped: the best attempt so far stays.
        fresh = [(live, made[id(live)]) for live in lives if id(live) in made]
        scores = self._score_all([(live, reply) for live, (reply, _) in fresh], histories)
        for (live, (reply, finish)), score in zip(fresh, scores, strict=True):
            if score is None or not live.active:
                continue
            turn = turns[id(live)]
            turn.attempts.append(self._attempt(live, "regen", reply, finish, score, histories))
            keep_best(turn)

    # --------------------------------------------------------------- helpers
    def _chat_messages(self, history: list[tuple[str, str]]) -> list[ChatMessage]:
        return [
            ChatMessage("system", str(self.system_prompt)),
            *(ChatMessage(role, content) for role, content in history),  # type: ignore[arg-type]
        ]

    def _row_seeds(self, lives: list[_Live]) -> list[int | None]:
        """One sampling seed per row, from the run seed and the dialogue's own state."""
        if self.config.seed is None:
            return [None] * len(lives)
        slots: Counter[int] = Counter()
        out: list[int | None] = []
        for live in lives:
            phase = len(live.history())
            key = (
                f"{self.config.seed}|{live.persona.id}|{live.replica}|{phase}|"
                f"{live.calls[phase]}|{slots[id(live)]}"
            )
            slots[id(live)] += 1
            out.append(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest()) >> 2)
        for live in {id(x): x for x in lives}.values():
            live.calls[len(live.history())] += 1
        return out

    def _generate(
        self, role: str, lives: list[_Live], convs: list[list[ChatMessage]]
    ) -> list[tuple[_Live, Completion]]:
        """One batched call; on repeated failure, retry items alone, failing only those."""
        model = self.chatbot if role == "chatbot" else self.user_model
        params = self.config.chatbot_params if role == "chatbot" else self.config.user_params
        adapter = self.config.adapter if role == "chatbot" else None
        if not lives:
            return []

        def call(items: list[tuple[list[ChatMessage], int | None]]) -> list[Completion]:
            seeds = [seed for _, seed in items]
            return model.generate_batch(
                [conv for conv, _ in items],
                params,
                adapter=adapter,
                seeds=None if None in seeds else seeds,  # type: ignore[arg-type]
            )

        items = list(zip(convs, self._row_seeds(lives), strict=True))
        results = self._with_retries(role, lives, items, call)
        out = []
        for live, completion in results:
            live.record.tokens.add(role, completion.prompt_tokens + completion.completion_tokens)
            out.append((live, completion))
        return out

    def _with_retries(self, role: str, lives: list[_Live], items: list[Any], call: Callable):
        cfg = self.config
        error: BaseException | None = None
        for attempt in range(cfg.role_retries):
            try:
                return list(zip(lives, call(items), strict=True))
            except _RETRYABLE as exc:
                error = exc
                log.warning("%s call failed (attempt %d): %s", role, attempt + 1, exc)
                time.sleep(cfg.retry_backoff_s * (attempt + 1))
        if len(lives) == 1:
            self._fail(lives[0], f"{role}: {type(error).__name__}: {error}")
            return []
        out = []
        for live, item in zip(lives, items, strict=True):
            if live.active:  # a dialogue that failed on an earlier item is not asked again
                out.extend(self._with_retries(role, [live], [item], call))
        return out

    def _score_all(
        self, pairs: list[tuple[_Live, str]], histories: dict[int, list[tuple[str, str]]]
    ) -> list[Score | None]:
        """Scores aligned with ``pairs``; None where the dialogue failed (or had failed)."""
        keep = [k for k, (live, _) in enumerate(pairs) if live.active]
        out: list[Score | None] = [None] * len(pairs)
        if not keep:
            return out
        items = [
            CriticInput(
                user_name=pairs[k][0].persona.name,
                background=pairs[k][0].persona.background,
                history=tuple(histories[id(pairs[k][0])]),
                reply=pairs[k][1],
            )
            for k in keep
        ]
        lives = [pairs[k][0] for k in keep]
        scored = iter(self._with_retries("critic", lives, items, self.critic.score_batch))
        pending = next(scored, None)
        # Results keep their order; a per-item retry drops only the items that failed.
        for k in keep:
            if pending is not None and pending[0] is pairs[k][0]:
                out[k] = pending[1]
                pairs[k][0].record.tokens.add("critic", pending[1].tokens)
                pending = next(scored, None)
        return out

    def _user_answers(
        self,
        lives: list[_Live],
        *,
        first_turn: bool,
        histories: dict[int, list[tuple[str, str]]] | None = None,
    ) -> list[tuple[_Live, str]]:
        """User-model replies, repaired by ``clean_user_text``; an answer that stays out of
        character (help offers, AI talk, labels, placeholders, echoes) comes back "" and is
        resampled, up to 5 samples, then the dialogue fails."""
        answers: dict[int, str] = {}
        pending = [live for live in lives if live.active]
        for _ in range(max(self.config.role_retries, 5)):
            if not pending:
                break
            seen = {
                id(live): histories[id(live)] if histories else live.history() for live in pending
            }
            convs = [user_messages(x.persona, seen[id(x)], first_turn=first_turn) for x in pending]
            still = []
            for live, completion in self._generate("user", pending, convs):
                bot = next((c for r, c in reversed(seen[id(live)]) if r == "assistant"), "")
                own = [c for r, c in seen[id(live)] if r == "user"]
                text = clean_user_text(
                    completion.text, live.persona.name, last_bot=bot, earlier=own
                )
                if text:
                    answers[id(live)] = text
                else:
                    still.append(live)
            pending = still
        for live in pending:
            if live.active:
                self._fail(live, "user: no usable answer after retries")
        return [(live, answers[id(live)]) for live in lives if live.active and id(live) in answers]

    def _fail(self, live: _Live, cause: str) -> None:
        log.warning("dialogue %s (%s) failed: %s", live.record.id, live.persona.id, cause)
        live.record.status = "failed"
        live.record.cause = cause
        self._finish(live)

    def _finish(self, live: _Live) -> None:
        if self.store is not None:
            self.store.finish_dialogue(live.record)
        self.progress("dialogue", 1)


def run_dialogues(
    chatbot: ChatModel,
    user_model: ChatModel,
    critic: Critic,
    personas: Sequence[PersonaLike],
    *,
    turns: int = 5,
    regenerate: bool = False,
    adapter: str | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    max_regenerations: int = 3,
    accept_threshold: int = 4,
    best_of_n: int = 2,
    chatbot_params: GenerationParams | None = None,
    user_params: GenerationParams | None = None,
) -> list[DialogueRecord]:
    """T-turn dialogues with every reply except the greeting scored (no storage).

    With ``regenerate=False`` (evaluation) the first attempt is the final reply.
    """
    config = GenerationConfig(
        turns=turns,
        max_regenerations=max_regenerations if regenerate else 0,
        best_of_n=best_of_n if regenerate else 1,
        accept_threshold=accept_threshold,
        batch_size=batch_size,
        adapter=adapter,
        seed=seed,
    )
    if chatbot_params is not None:
        config.chatbot_params = chatbot_params
    if user_params is not None:
        config.user_params = user_params
    return CorpusGenerator(chatbot, user_model, critic, config).run(personas).dialogues
