"""The critic: scores a chatbot reply on rel / int / val from the user's point of view.

The implementations share one interface (``score_batch(items) -> list[Score]``):

- ``TextJudgeCritic``: any ``ChatModel`` answers in text; a tolerant parser reads it and the
  judge is re-asked up to 3 times; after that the reply is *unscored* (never invented).
- ``LogitCritic``: a local transformers model; the score at each slot is the expected value
  of the next-token distribution over "1".."5", so even a tiny model yields a valid score.
- ``EmbeddingCritic``: model-free, with the shipped MiniLM (formulas in docs/critic.md).
- ``RubricCritic`` (``learner.rubric_critic``, the default): MiniLM + the reply checks of
  ``learner.reply_checks``, calibrated on base-model replies.

``CachedCritic`` wraps any of them with a content-hash cache. ``build_critic`` is the one
way to make a critic (by name, or a role's through ``critic_kind``), including the
evaluation-only ``spc`` critic of ``learner.eval_critic``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from core.embeddings import Embedder
from core.prompting import load_prompt
from core.runtime import ModelPool
from core.settings import Settings
from core.types import ChatMessage, ChatModel, GenerationParams
from learner.critic_parse import parse_judgement
from learner.embedding_critic import EmbeddingCritic, score_from_expected
from learner.eval_critic import PersonaChatCritic
from learner.records import DIMENSIONS, CriticInput, Score
from learner.rubric_critic import RubricCritic

__all__ = [
    "CRITIC_BUILDERS",
    "EVAL_CRITIC_BUILDERS",
    "CachedCritic",
    "Critic",
    "CriticBuilder",
    "CriticRole",
    "EmbeddingCritic",
    "LogitCritic",
    "TextJudgeCritic",
    "build_critic",
    "build_critic_kind",
    "critic_kind",
    "critic_messages",
    "format_history",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_DIM_NAMES = {"rel": "relevance", "int": "interest", "val": "value"}
# What a low score on each dimension means, phrased for the regeneration request.
_LOW_REASONS = {
    "rel": "it is not tailored to this person's background or interests",
    "int": "it is unlikely to interest this person; it does not pick up what they said",
    "val": "it carries little substance (generic, repetitive or shallow)",
}


@runtime_checkable
class Critic(Protocol):
    model_id: str
    prompt_version: str

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]: ...


def format_history(history: Sequence[tuple[str, str]], user_name: str) -> str:
    lines = []
    for role, content in history:
        speaker = "Chatbot" if role == "assistant" else user_name
        lines.append(f"{speaker}: {content}")
    return "\n".join(lines) if lines else "(nothing yet)"


def critic_messages(item: CriticInput) -> list[ChatMessage]:
    # The rubric is the same for every item (a shareable KV/prompt-cache prefix); who the
    # user is goes in the request.
    system = str(load_prompt("critic", "learner"))
    request = load_prompt("critic_request", "learner").fill(
        name=item.user_name,
        background=item.background,
        history=format_history(item.history, item.user_name),
        reply=item.reply,
    )
    return [ChatMessage("system", system), ChatMessage("user", request)]


def _prompt_version(*names: str) -> str:
    return "+".join(load_prompt(n, "learner").version for n in names)


class TextJudgeCritic:
    """An LLM judge answering in text (local or OpenAI-compatible), temperature 0."""

    def __init__(
        self,
        model: ChatModel,
        *,
        max_reasks: int = 3,
        max_new_tokens: int = 160,
        adapter: str | None = None,
    ):
        self.model = model
        self.max_reasks = max_reasks
        self.adapter = adapter
        self.params = GenerationParams(
            max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0
        )
        self.model_id = f"llm-text:{model.model_id}"
        self.prompt_version = _prompt_version("critic", "critic_request", "critic_reask")

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        convs = [critic_messages(item) for item in items]
        raws: list[list[str]] = [[] for _ in items]
        tokens = [0] * len(items)
        results: list[Score | None] = [None] * len(items)
        pending = list(range(len(items)))
        reask = load_prompt("critic_reask", "learner")
        for attempt in range(1, self.max_reasks + 2):
            if not pending:
                break
            completions = self.model.generate_batch(
                [convs[i] for i in pending], self.params, adapter=self.adapter
            )
            still: list[int] = []
            for i, completion in zip(pending, completions, strict=True):
                text = completion.text
                raws[i].append(text)
                tokens[i] += completion.prompt_tokens + completion.completion_tokens
                parsed = parse_judgement(text)
                if parsed.ok:
                    results[i] = Score(
                        **parsed.scores,
                        reasons={d: parsed.reasons.get(d, "") for d in DIMENSIONS},
                        raw=text,
                        critic_model_id=self.model_id,
                        attempts=attempt,
                        tokens=tokens[i],
                    )
                else:
                    log.debug("critic answer did not parse (%s): %r", parsed.error, text[:200])
                    convs[i] = [
                        *convs[i],
                        ChatMessage("assistant", text),
                        ChatMessage("user", str(reask)),
                    ]
                    still.append(i)
            pending = still
        for i in pending:
            results[i] = Score.unscored(
                "\n---\n".join(raws[i]), self.model_id, len(raws[i]), tokens=tokens[i]
            )
        return [r for r in results if r is not None]


_MIN_SHARED_PREFIX = 16  # below this a shared prefix pass costs more than it saves


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Tokens shared by every row, leaving each row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


class LogitCritic:
    """Reads the judge's next-token probabilities for "1".."5" at each score slot.

    ``run`` executes ``fn(model, tokenizer)`` where the model lives (``LocalModel.run_exclusive``
    serialises it with generation). Slots are filled in order rel, int, val, each conditioned
    on the most likely digit of the previous slots.
    """

    def __init__(
        self,
        run: Callable[[Callable[[Any, Any], Any]], Any],
        model_id: str,
        *,
        batch_size: int = 8,
        share_prefix: bool = True,
    ):
        self._run = run
        self.model_id = f"llm-logit:{model_id}"
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.prompt_version = _prompt_version("critic", "critic_request")

    @classmethod
    def from_local_model(cls, local_model: Any, *, batch_size: int = 8) -> LogitCritic:
        return cls(local_model.run_exclusive, local_model.model_id, batch_size=batch_size)

    @classmethod
    def from_hf(cls, model: Any, tokenizer: Any, model_id: str, **kw: Any) -> LogitCritic:
        return cls(lambda fn: fn(model, tokenizer), model_id, **kw)

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        if not items:
            return []
        return self._run(lambda model, tok: self._score(model, tok, list(items)))

    @staticmethod
    def _digit_ids(tok: Any) -> list[list[int]]:
        ids: list[list[int]] = []
        for digit in "12345":
            variants = []
            for text in (digit, " " + digit):
                enc = tok.encode(text, add_special_tokens=False)
                if len(enc) == 1:
                    variants.append(enc[0])
            if not variants:
                raise ValueError(f"the tokenizer has no single token for {digit!r}")
            ids.append(sorted(set(variants)))
        return ids

    def _score(self, model: Any, tok: Any, items: list[CriticInput]) -> list[Score]:
        digit_ids = self._digit_ids(tok)
        bases = []
        for item in items:
            msgs = [{"role": m.role, "content": m.content} for m in critic_messages(item)]
            bases.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        dists: list[dict[str, list[float]]] = [{} for _ in items]
        mass: list[dict[str, float]] = [{} for _ in items]
        prompt_tokens = [0] * len(items)
        old_side = tok.padding_side
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        # The judge is the base model: a chatbot LoRA adapter must not colour its scores.
        base = model.disable_adapter() if hasattr(model, "peft_config") else nullcontext()
        try:
            with base:
                for start in range(0, len(items), self.batch_size):
                    rows = list(range(start, min(start + self.batch_size, len(items))))
                    self._score_chunk(
                        model,
                        tok,
                        [bases[i] for i in rows],
                        digit_ids,
                        rows,
                        dists,
                        mass,
                        prompt_tokens,
                    )
        finally:
            tok.padding_side = old_side
        scores = []
        for i in range(len(items)):
            expected = {
                d: float(sum((k + 1) * p for k, p in enumerate(dists[i][d]))) for d in DIMENSIONS
            }
            ints = {d: score_from_expected(expected[d]) for d in DIMENSIONS}
            reasons = {
                d: (
                    _LOW_REASONS[d] + f" (expected {_DIM_NAMES[d]} {expected[d]:.2f})"
                    if ints[d] < 4
                    else f"the judge expects {_DIM_NAMES[d]} {expected[d]:.2f}"
                )
                for d in DIMENSIONS
            }
            raw = json.dumps({"distribution": dists[i], "digit_mass": mass[i]})
            scores.append(
                Score(
                    **ints,
                    reasons=reasons,
                    raw=raw,
                    critic_model_id=self.model_id,
                    expected=expected,
                    distribution=dists[i],
                    tokens=prompt_tokens[i],
                )
            )
        return scores

    def _score_chunk(
        self,
        model: Any,
        tok: Any,
        texts: list[str],
        digit_ids: list[list[int]],
        rows: list[int],
        dists: list[dict[str, list[float]]],
        mass: list[dict[str, float]],
        prompt_tokens: list[int],
    ) -> None:
        """Score one batch: the prompt runs once, then each later slot reuses its KV cache.

        The rubric that opens every critic prompt is the same for all rows: its KV is
        computed once and shared by the batch, so only the per-row suffix is prefilled.
        """
        import torch

        device = next(model.parameters()).device
        prompts = [
            tok(t + f"{DIMENSIONS[0]}:", add_special_tokens=False)["input_ids"] for t in texts
        ]
        shared = _common_prefix_len(prompts) if self.share_prefix else 0
        past = None
        if shared >= _MIN_SHARED_PREFIX:
            with torch.no_grad():
                prefix_out = model(
                    input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True
                )
            past = prefix_out.past_key_values
            if len(prompts) > 1:
                past.batch_repeat_interleave(len(prompts))
        else:
            shared = 0
        suffixes = [x[shared:] for x in prompts]
        width = max(len(x) for x in suffixes)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes], device=device)
        attn = torch.tensor(
            [[1] * shared + [0] * (width - len(x)) + [1] * len(x) for x in suffixes],
            device=device,
        )
        for k, dim in enumerate(DIMENSIONS):
            positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            with torch.no_grad():
                out = model(
                    input_ids=input_ids,
                    attention_mask=attn,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=k + 1 < len(DIMENSIONS),
                    logits_to_keep=1,
                )
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)
            best = []
            for r, i in enumerate(rows):
                raw = [float(probs[r, ids].sum()) for ids in digit_ids]
                total = sum(raw)
                mass[i][dim] = total
                dists[i][dim] = [p / total for p in raw]
                best.append(int(np.argmax(dists[i][dim])) + 1)
            if k + 1 == len(DIMENSIONS):
                break
            # Next slot: the most likely digit of this one, then the next key.
            suffix = [
                tok(f" {b}\n{DIMENSIONS[k + 1]}:", add_special_tokens=False)["input_ids"]
                for b in best
            ]
            width = max(len(x) for x in suffix)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffix], device=device)
            new_mask = torch.tensor(
                [[0] * (width - len(x)) + [1] * len(x) for x in suffix], device=device
            )
            attn = torch.cat([attn, new_mask.to(attn.dtype)], dim=-1)
        for r, i in enumerate(rows):
            prompt_tokens[i] += int(attn[r].sum())


def _cache_key(critic: Critic, item: CriticInput) -> str:
    payload = json.dumps(
        [
            critic.model_id,
            critic.prompt_version,
            item.user_name,
            item.background,
            item.history,
            item.reply,
        ],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class CachedCritic:
    """Caches scored results by a hash of the critic's identity and the judged content."""

    def __init__(self, inner: Critic, max_entries: int = 50_000):
        self.inner = inner
        self.model_id = inner.model_id
        self.prompt_version = inner.prompt_version
        self.max_entries = max_entries
        self._cache: OrderedDict[str, Score] = OrderedDict()
        self.hits = 0

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        keys = [_cache_key(self.inner, item) for item in items]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh = self.inner.score_batch([items[i] for i in missing]) if missing else []
        for i, score in zip(missing, fresh, strict=True):
            if score.scored:  # an unscored answer may parse on a later ask
                self._cache[keys[i]] = score
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        out: list[Score] = []
        fresh_by_index = dict(zip(missing, fresh, strict=True))
        for i, key in enumerate(keys):
            if i in fresh_by_index:
                out.append(fresh_by_index[i])
            else:
                self.hits += 1
                self._cache.move_to_end(key)
                cached = Score.from_dict(self._cache[key].to_dict())
                cached.tokens = 0
                out.append(cached)
        return out


CriticBuilder = Callable[[Settings, "ChatModel | None", Embedder | None], Critic]
# Whose critic: training (Algorithm 1 and the selection), evaluation, or the gate.
CriticRole = Literal["train", "eval", "gate"]


def _build_rubric(settings: Settings, model: ChatModel | None, embedder: Embedder | None) -> Critic:
    return RubricCritic(embedder if embedder is not None else Embedder())


def _build_embedding(
    settings: Settings, model: ChatModel | None, embedder: Embedder | None
) -> Critic:
    return EmbeddingCritic(embedder if embedder is not None else Embedder())


def _build_llm(settings: Settings, model: ChatModel | None, embedder: Embedder | None) -> Critic:
    # A model exposing ``run_exclusive`` (the local backend) is read through its logits;
    # any other ``ChatModel`` (e.g. OpenAI-compatible) is a text judge.
    if model is None:
        raise ValueError("the llm critic needs a model (settings.critic)")
    if hasattr(model, "run_exclusive"):
        return LogitCritic.from_local_model(model)
    return TextJudgeCritic(model)


def _build_spc(settings: Settings, model: ChatModel | None, embedder: Embedder | None) -> Critic:
    return PersonaChatCritic(embedder if embedder is not None else Embedder())


# The training critics, known by name. ``build_critic_kind`` takes more through
# ``extra_builders``; ``build_critic`` adds the evaluation-only ones.
CRITIC_BUILDERS: Mapping[str, CriticBuilder] = MappingProxyType(
    {"rubric": _build_rubric, "embedding": _build_embedding, "llm": _build_llm}
)
# Never a training critic: training must not optimise the critic that evaluates it.
EVAL_CRITIC_BUILDERS: Mapping[str, CriticBuilder] = MappingProxyType({"spc": _build_spc})


def build_critic_kind(
    kind: str,
    settings: Settings,
    model: ChatModel | None = None,
    embedder: Embedder | None = None,
    *,
    extra_builders: Mapping[str, CriticBuilder] | None = None,
) -> Critic:
    """The critic called ``kind`` ("rubric", "embedding", "llm", or an extra one), cached."""
    builders = {**CRITIC_BUILDERS, **(extra_builders or {})}
    if kind not in builders:
        raise ValueError(f"unknown critic {kind!r}: use one of {', '.join(sorted(builders))}")
    return CachedCritic(builders[kind](settings, model, embedder))


def critic_kind(settings: Settings, role: CriticRole = "train") -> str:
    """The critic a role uses: ``learner.critics.critic`` trains, ``eval_critic`` evaluates,
    and the gate uses ``learner.gate.gate_critic``, where ``eval`` means the evaluation one."""
    critics = settings.learner.critics
    if role == "train":
        return critics.critic
    if role == "eval":
        return critics.eval_critic
    kind = settings.learner.gate.gate_critic
    return critics.eval_critic if kind == "eval" else kind


def build_critic(
    settings: Settings,
    model: ChatModel | None = None,
    embedder: Embedder | None = None,
    *,
    kind: str | None = None,
    pool: ModelPool | None = None,
) -> Critic:
    """The one way to make a critic, cached: ``kind`` by name (any training critic or
    ``spc``; default: the training critic). The ``llm`` critic judges with ``model``, else
    with the ``settings.critic`` role's model from ``pool``."""
    kind = kind or critic_kind(settings, "train")
    if kind == "llm" and model is None and pool is not None:
        model = pool.get(settings.critic)
    return build_critic_kind(kind, settings, model, embedder, extra_builders=EVAL_CRITIC_BUILDERS)
