"""Persistence of generation runs: every step is written as it happens, so a run resumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from learner.records import Attempt, DialogueRecord, Score, TokenCounts, TurnRecord
from storage.corpus_models import CurriculumRow, DialogueRow, RunRow, TurnRow
from storage.db import Database
from storage.models import utcnow

__all__ = ["CorpusStore", "CurriculumState", "RunInfo"]


@dataclass(frozen=True)
class RunInfo:
    id: str
    iteration: int
    split: str
    status: str
    config: dict[str, Any]
    stats: dict[str, Any] | None


@dataclass(frozen=True)
class CurriculumState:
    iteration: int
    run_id: str
    alpha: int
    beta: int
    easy_dialogue_ids: list[str]
    difficult_dialogue_ids: list[str]
    pending_persona_ids: list[str]
    ids_hash: str
    stats: dict[str, Any]
    output_dir: str


def _run_info(row: RunRow) -> RunInfo:
    return RunInfo(row.id, row.iteration, row.split, row.status, dict(row.config), row.stats)


def _turn_record(row: TurnRow) -> TurnRecord:
    return TurnRecord(
        index=row.turn_index,
        user_message=row.user_message,
        first_reply=row.first_reply,
        first_score=Score.from_dict(row.first_score),
        final_reply=row.final_reply,
        final_score=Score.from_dict(row.final_score),
        regenerations=row.regenerations,
        apology_retries=row.apology_retries,
        user_answer=row.user_answer,
        attempts=[Attempt.from_dict(a) for a in (row.attempts or [])],
        final_finish_reason=row.final_finish_reason or "",
    )


def _dialogue_record(row: DialogueRow) -> DialogueRecord:
    return DialogueRecord(
        id=row.id,
        persona_id=row.persona_id,
        persona_name=row.persona_name,
        status=row.status,
        cause=row.cause,
        greeting=row.greeting,
        user_intro=row.user_intro,
        turns=[_turn_record(t) for t in row.turns],
        tokens=TokenCounts(row.tokens_chatbot, row.tokens_user, row.tokens_critic),
        chatbot_model_id=row.chatbot_model_id,
        user_model_id=row.user_model_id,
        critic_model_id=row.critic_model_id,
        adapter=row.adapter,
        prompt_versions=dict(row.prompt_versions or {}),
    )


class CorpusStore:
    """Runs, dialogues and turns of Algorithm 1, and the curriculum state per iteration."""

    def __init__(self, db: Database):
        self.db = db

    # ------------------------------------------------------------------ runs
    def open_run(
        self, iteration: int, *, split: str, config: dict[str, Any], models: dict[str, Any]
    ) -> tuple[RunInfo, bool]:
        """The run of ``iteration``, created if new; returns (run, resumed)."""
        with self.db.session() as s:
            row = s.scalar(select(RunRow).where(RunRow.iteration == iteration))
            if row is not None:
                return _run_info(row), True
            row = RunRow(iteration=iteration, split=split, config=config, **models)
            s.add(row)
            s.flush()
            return _run_info(row), False

    def get_run(self, iteration: int) -> RunInfo | None:
        with self.db.session() as s:
            row = s.scalar(select(RunRow).where(RunRow.iteration == iteration))
            return _run_info(row) if row else None

    def iterations(self) -> list[int]:
        with self.db.session() as s:
            return list(s.scalars(select(RunRow.iteration).order_by(RunRow.iteration)))

    def finish_run(self, run_id: str, stats: dict[str, Any], tokens: TokenCounts) -> None:
        with self.db.session() as s:
            row = s.get(RunRow, run_id)
            row.status = "done"
            row.stats = stats
            row.tokens_chatbot, row.tokens_user, row.tokens_critic = (
                tokens.chatbot,
                tokens.user,
                tokens.critic,
            )
            row.finished_at = utcnow()

    # ------------------------------------------------------------- dialogues
    def dialogues(self, run_id: str) -> list[DialogueRecord]:
        with self.db.session() as s:
            rows = s.scalars(
                select(DialogueRow)
                .where(DialogueRow.run_id == run_id)
                .order_by(DialogueRow.position)
            ).all()
            return [_dialogue_record(r) for r in rows]

    def persona_ids(self, run_id: str | None = None) -> set[str]:
        """Personas that already have a dialogue (in one run, or in any run)."""
        with self.db.session() as s:
            query = select(DialogueRow.persona_id)
            if run_id is not None:
                query = query.where(DialogueRow.run_id == run_id)
            return set(s.scalars(query))

    def begin_dialogue(self, run_id: str, position: int, record: DialogueRecord) -> DialogueRecord:
        """Create the dialogue row, or return the stored one (possibly part-way) to resume."""
        with self.db.session() as s:
            row = s.scalar(
                select(DialogueRow).where(
                    DialogueRow.run_id == run_id, DialogueRow.persona_id == record.persona_id
                )
            )
            if row is not None:
                return _dialogue_record(row)
            row = DialogueRow(
                id=record.id,
                run_id=run_id,
                position=position,
                persona_id=record.persona_id,
                persona_name=record.persona_name,
                status="running",
                chatbot_model_id=record.chatbot_model_id,
                user_model_id=record.user_model_id,
                critic_model_id=record.critic_model_id,
                adapter=record.adapter,
                prompt_versions=record.prompt_versions,
            )
            s.add(row)
        return record

    def save_opening(self, record: DialogueRecord) -> None:
        with self.db.session() as s:
            row = s.get(DialogueRow, record.id)
            row.greeting = record.greeting
            row.user_intro = record.user_intro
            self._set_tokens(row, record.tokens)

    def save_turn(self, record: DialogueRecord, turn: TurnRecord, accept_threshold: int) -> None:
        """Store a finished turn and the dialogue's token counts in one transaction."""
        first, final = turn.first_score, turn.final_score
        with self.db.session() as s:
            s.add(
                TurnRow(
                    dialogue_id=record.id,
                    turn_index=turn.index,
                    user_message=turn.user_message,
                    first_reply=turn.first_reply,
                    first_rel=first.rel,
                    first_int=first.int,
                    first_val=first.val,
                    first_score=first.to_dict(),
                    final_reply=turn.final_reply,
                    final_rel=final.rel,
                    final_int=final.int,
                    final_val=final.val,
                    final_score=final.to_dict(),
                    regenerations=turn.regenerations,
                    apology_retries=turn.apology_retries,
                    accepted=turn.accepted(accept_threshold),
                    user_answer=turn.user_answer,
                    attempts=[a.to_dict() for a in turn.attempts],
                    final_finish_reason=turn.final_finish_reason,
                )
            )
            self._set_tokens(s.get(DialogueRow, record.id), record.tokens)

    def finish_dialogue(self, record: DialogueRecord) -> None:
        with self.db.session() as s:
            row = s.get(DialogueRow, record.id)
            row.status = record.status
            row.cause = record.cause
            row.finished_at = utcnow()
            self._set_tokens(row, record.tokens)

    @staticmethod
    def _set_tokens(row: DialogueRow, tokens: TokenCounts) -> None:
        row.tokens_chatbot, row.tokens_user, row.tokens_critic = (
            tokens.chatbot,
            tokens.user,
            tokens.critic,
        )

    # ------------------------------------------------------------ curriculum
    def save_curriculum(self, state: CurriculumState) -> None:
        with self.db.session() as s:
            row = s.get(CurriculumRow, state.iteration) or CurriculumRow(iteration=state.iteration)
            row.run_id = state.run_id
            row.alpha, row.beta = state.alpha, state.beta
            row.easy_dialogue_ids = state.easy_dialogue_ids
            row.difficult_dialogue_ids = state.difficult_dialogue_ids
            row.pending_persona_ids = state.pending_persona_ids
            row.ids_hash = state.ids_hash
            row.stats = state.stats
            row.output_dir = state.output_dir
            s.add(row)

    def curriculum(self, iteration: int) -> CurriculumState | None:
        with self.db.session() as s:
            row = s.get(CurriculumRow, iteration)
            if row is None:
                return None
            return CurriculumState(
                iteration=row.iteration,
                run_id=row.run_id,
                alpha=row.alpha,
                beta=row.beta,
                easy_dialogue_ids=list(row.easy_dialogue_ids),
                difficult_dialogue_ids=list(row.difficult_dialogue_ids),
                pending_persona_ids=list(row.pending_persona_ids),
                ids_hash=row.ids_hash,
                stats=dict(row.stats),
                output_dir=row.output_dir,
            )
