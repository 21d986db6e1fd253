"""Arrow schemas of the export: one row per conversation (JSONL, HF) or per message (Parquet)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from learner.export.records import ExportRecord

__all__ = ["CONVERSATION_SCHEMA", "MESSAGE_SCHEMA", "message_rows"]

_CRITIC_TYPE = pa.struct(
    [
        ("rel", pa.int64()),
        ("int", pa.int64()),
        ("val", pa.int64()),
        ("mean", pa.float64()),
        ("reasons", pa.struct([("rel", pa.string()), ("int", pa.string()), ("val", pa.string())])),
        ("critic_model_id", pa.string()),
    ]
)
_ATTEMPT_TYPE = pa.struct(
    [
        ("content", pa.string()),
        ("origin", pa.string()),
        ("critic", _CRITIC_TYPE),
        ("feedback", pa.int64()),
    ]
)
_TURN_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("message_id", pa.string()),
        ("seq", pa.int64()),
        ("created_at", pa.string()),
        ("status", pa.string()),
        ("adapter_id", pa.string()),
        ("model_id", pa.string()),
        ("critic", _CRITIC_TYPE),
        ("first_critic", _CRITIC_TYPE),
        ("regenerations", pa.int64()),
        ("regeneration_history", pa.list_(_ATTEMPT_TYPE)),
        ("feedback", pa.int64()),
        ("feedback_reason", pa.string()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("gen_params_json", pa.string()),
    ]
)
_META_TYPE = pa.struct(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("created_at", pa.string()),
        ("updated_at", pa.string()),
        ("split", pa.string()),
        ("user", pa.string()),
        ("title", pa.string()),
        ("persona_id", pa.string()),
        ("iteration", pa.int64()),
        ("status", pa.string()),
        ("adapter_ids", pa.list_(pa.string())),
        ("n_messages", pa.int64()),
        ("n_bot_turns", pa.int64()),
        ("regenerated", pa.bool_()),
        ("regenerations", pa.int64()),
        ("mean_rel", pa.float64()),
        ("mean_int", pa.float64()),
        ("mean_val", pa.float64()),
        ("mean_score", pa.float64()),
        ("likes", pa.int64()),
        ("dislikes", pa.int64()),
        ("chatbot_model_id", pa.string()),
        ("critic_model_id", pa.string()),
    ]
)
# One row per conversation (the JSONL record and the HF dataset).
CONVERSATION_SCHEMA = pa.schema(
    [
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("upc", _META_TYPE),
        ("upc_turns", pa.list_(_TURN_TYPE)),
    ]
)
# One row per message, flat (Parquet).
MESSAGE_SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("user", pa.string()),
        ("conversation_created_at", pa.string()),
        ("title", pa.string()),
        ("persona_id", pa.string()),
        ("iteration", pa.int64()),
        ("conversation_mean_score", pa.float64()),
        ("turn", pa.int64()),
        ("role", pa.string()),
        ("content", pa.string()),
        ("message_id", pa.string()),
        ("seq", pa.int64()),
        ("created_at", pa.string()),
        ("status", pa.string()),
        ("adapter_id", pa.string()),
        ("model_id", pa.string()),
        ("rel", pa.int64()),
        ("int", pa.int64()),
        ("val", pa.int64()),
        ("score_mean", pa.float64()),
        ("reason_rel", pa.string()),
        ("reason_int", pa.string()),
        ("reason_val", pa.string()),
        ("critic_model_id", pa.string()),
        ("first_rel", pa.int64()),
        ("first_int", pa.int64()),
        ("first_val", pa.int64()),
        ("regenerations", pa.int64()),
        ("regeneration_history_json", pa.string()),
        ("feedback", pa.int64()),
        ("feedback_reason", pa.string()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("gen_params_json", pa.string()),
    ]
)


def message_rows(record: ExportRecord) -> Iterator[dict[str, Any]]:
    meta = record.meta
    for i, ((role, content), t) in enumerate(zip(record.messages, record.turns, strict=True)):
        c, first = t.critic, t.first_critic
        yield {
            "conversation_id": meta.id,
            "source": meta.source,
            "split": meta.split,
            "user": meta.user,
            "conversation_created_at": meta.created_at,
            "title": meta.title,
            "persona_id": meta.persona_id,
            "iteration": meta.iteration,
            "conversation_mean_score": float(meta.mean_score),
            "turn": i,
            "role": role,
            "content": content,
            "message_id": t.message_id,
            "seq": t.seq,
            "created_at": t.created_at,
            "status": t.status,
            "adapter_id": t.adapter_id,
            "model_id": t.model_id,
            "rel": c.rel,
            "int": c.int,
            "val": c.val,
            "score_mean": float(c.mean),
            "reason_rel": c.reason_rel,
            "reason_int": c.reason_int,
            "reason_val": c.reason_val,
            "critic_model_id": c.critic_model_id,
            "first_rel": first.rel,
            "first_int": first.int,
            "first_val": first.val,
            "regenerations": t.regenerations,
            "regeneration_history_json": json.dumps(
                [a.to_json() for a in t.regeneration_history], ensure_ascii=False
            ),
            "feedback": t.feedback,
            "feedback_reason": t.feedback_reason,
            "latency_ms": float(t.latency_ms),
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "gen_params_json": t.gen_params_json,
        }
