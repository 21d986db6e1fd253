"""Training data for the SFT and DPO stages: reading the curriculum's JSONL files and
tokenizing conversations with the loss on the chatbot's reply tokens only.

Every conversation is rendered with the model's own chat template and tokenized here into
`input_ids`/`labels`, with -100 on every token except the content of the target assistant
messages and the end-of-turn token that closes each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "TokenizedExample",
    "TrainingDataError",
    "build_example",
    "load_pairs",
    "load_sft_dialogues",
    "tokenize_all",
]

IGNORE_INDEX = -100


class TrainingDataError(ValueError):
    """The training files are missing, malformed or hold nothing to learn from."""


@dataclass(frozen=True)
class TokenizedExample:
    dialogue_id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TrainingDataError(f"{path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise TrainingDataError(f"{path}:{n} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise TrainingDataError(f"{path}:{n} is not a JSON object")
            rows.append(row)
    return rows


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise TrainingDataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise TrainingDataError(f"{where}: malformed message {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_sft_dialogues(
    path: Path, system_prompt: str
) -> list[tuple[str, list[dict[str, str]], bool]]:
    """(dialogue_id, messages, last_only) from `sft.jsonl`; a missing system message gets
    the app's. Rows with `"loss": "last"` (logged real dialogues, where only the final reply
    was judged) train on their last assistant reply alone."""
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        messages = _check_messages(row.get("messages"), f"{path}:{n}")
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        last_only = row.get("loss") == "last"
        out.append((str(row.get("dialogue_id", f"line-{n}")), messages, last_only))
    return out


def load_pairs(path: Path, system_prompt: str) -> list[dict[str, Any]]:
    """Preference pairs in TRL's conversational format (prompt / chosen / rejected)."""
    out = []
    for n, row in enumerate(_read_jsonl(path), 1):
        prompt = _check_messages(row.get("prompt"), f"{path}:{n}")
        if prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip():
            raise TrainingDataError(f"{path}:{n}: 'chosen' and 'rejected' must be strings")
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "rejected_capped": bool(row.get("rejected_capped", False)),
            }
        )
    return out


def without_turn_end(example: TokenizedExample) -> TokenizedExample:
    """The example with its last labelled token (the end-of-turn) unlabelled: a reply cut
    at the token cap never ended there, so that end must not be learned, nor unlearned."""
    labels = list(example.labels)
    last = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=None)
    if last is not None:
        labels[last] = IGNORE_INDEX
    return TokenizedExample(example.dialogue_id, list(example.input_ids), labels)


def tokenize_all(
    tokenizer: Any, rows: list[tuple[str, list[dict[str, str]], bool]], max_len: int
) -> list[TokenizedExample]:
    return [
        ex
        for did, messages, last_only in rows
        if (ex := build_example(tokenizer, did, messages, max_len, last_only=last_only)) is not None
    ]


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], gen_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=gen_prompt
    )


def build_example(
    tokenizer: Any,
    dialogue_id: str,
    messages: Sequence[dict[str, str]],
    max_len: int,
    *,
    last_only: bool = False,
) -> TokenizedExample | None:
    """Tokenize one conversation; labels are set on assistant content + its end-of-turn token.

    Character spans of each assistant reply are found by rendering prefixes with the chat
    template (so any template works), then mapped to tokens with the fast tokenizer's offsets.
    Returns None when truncation leaves no labelled token.
    """
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], gen_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(head):
            raise TrainingDataError("the chat template does not render conversations by prefix")
        # Keep the end-of-turn token, drop the template's trailing newline after it.
        end = len(upto.rstrip())
        spans.append((len(head), end))
    if last_only:
        spans = spans[-1:]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for k, (start, _stop) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[k] = input_ids[k]
    if last_only and len(input_ids) > max_len:
        # One target at the end: drop the oldest context, never the reply.
        input_ids, labels = input_ids[-max_len:], labels[-max_len:]
    input_ids, labels = input_ids[:max_len], labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels):
        return None
    return TokenizedExample(dialogue_id, input_ids, labels)
