"""The critic: scores a chatbot reply on rel / int / val from the user's point of view.

The implementations share one interface (``score_batch(items) -> list[Score]``):

- ``TextJudgeCritic``: any ``ChatModel`` answers in text; a tolerant parser reads it and the
  judge is re-asked up to 3 times; after that the reply is *unscored* (never invented).
- ``LogitCritic``: a local transformers model; the score at each slot is the expected value
  of the next-token distribution over "1".."5", so even a tiny model yields a valid score.
- ``EmbeddingCritic``: model-free, with the shipped MiniLM (formulas in docs/critic.md).
- ``RubricCritic`` (``learner.rubric_critic``, the default): MiniLM + the reply checks of
  ``learner.reply_checks``, calibrated on base-model replies.

``CachedCritic`` wraps any of them with a content-hash cache; ``build_critic`` picks one
from the settings, ``build_critic_kind`` by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from core.embeddings import Embedder
from core.prompting import load_prompt
from core.types import ChatMessage, ChatModel, GenerationParams
from learner.critic_parse import parse_judgement
from learner.records import DIMENSIONS, CriticInput, Score
from learner.rubric_critic import RubricCritic

__all__ = [
    "CRITIC_BUILDERS",
    "CachedCritic",
    "Critic",
    "CriticBuilder",
    "EmbeddingCritic",
    "LogitCritic",
    "TextJudgeCritic",
    "build_critic",
    "build_critic_kind",
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


def _score_from_expected(expected: float) -> int:
    return int(min(5, max(1, np.floor(expected + 0.5))))


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
            ints = {d: _score_from_expected(expected[d]) for d in DIMENSIONS}
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


_PASSIVE_PHRASES = (
    "How can I help you today?",
    "How can I assist you?",
    "Is there anything else I can help you with?",
    "Let me know if you need anything.",
    "What can I do for you?",
    "I'm here to help with whatever you need.",
    "Feel free to ask me anything.",
    "That's interesting! Tell me more.",
    "Sounds great!",
    "I see. Please go on.",
)
_STOPWORD_TEXT = """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    really also maybe perhaps quite lot lots thing things something anything everything get got
    like well yes yeah oh great good nice sure let know tell think sounds sound today there's
    it's that's i'm you're what's don't can't help assist"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[a-zA-Z][a-zA-Z'-]+")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if len(w) > 2 and w.lower() not in _STOPWORDS}


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


class EmbeddingCritic:
    """A model-free critic built on MiniLM sentence embeddings (see docs/critic.md)."""

    # Cosine ranges mapped linearly onto 0..1 (calibrated by eye on MiniLM; documented).
    REL_RANGE = (0.10, 0.50)
    INT_RANGE = (0.10, 0.55)
    PASSIVE_RANGE = (0.45, 0.75)
    REPEAT_RANGE = (0.70, 0.95)
    NOVEL_WORDS_FULL = 10

    def __init__(self, embedder: Any):
        self.embedder = embedder
        self.model_id = f"embedding:{embedder.model_id}"
        self.prompt_version = "embedding-v1"
        self._passive: np.ndarray | None = None

    def _passive_vectors(self) -> np.ndarray:
        if self._passive is None:
            self._passive = self.embedder.encode(list(_PASSIVE_PHRASES))
        return self._passive

    def score_batch(self, items: Sequence[CriticInput]) -> list[Score]:
        return [self._score_one(item) for item in items]

    def features(self, item: CriticInput) -> dict[str, float]:
        """The measured quantities every score is computed from."""
        bg_sentences = [s for s in _SENTENCE.split(item.background.strip()) if s]
        user_msgs = [c for r, c in item.history if r == "user" and c.strip()]
        bot_msgs = [c for r, c in item.history if r == "assistant" and c.strip()]
        texts = [item.reply, item.background, *bg_sentences, *user_msgs, *bot_msgs]
        vecs = self.embedder.encode(texts)
        reply, bg_full = vecs[0], vecs[1]
        n_bg = len(bg_sentences)
        bg_vecs = vecs[2 : 2 + n_bg]
        user_vecs = vecs[2 + n_bg : 2 + n_bg + len(user_msgs)]
        bot_vecs = vecs[2 + n_bg + len(user_msgs) :]
        sim_bg = 0.5 * float(reply @ bg_full) + 0.5 * float(np.max(bg_vecs @ reply) if n_bg else 0)
        sim_last = float(user_vecs[-1] @ reply) if len(user_msgs) else 0.0
        sim_topics = float(np.max(user_vecs @ reply)) if len(user_msgs) else 0.0
        passive = float(np.max(self._passive_vectors() @ reply))
        repeat_sem = float(np.max(bot_vecs @ reply)) if len(bot_msgs) else 0.0
        earlier = " ".join(c for _, c in item.history)
        reply_tri = _trigrams(item.reply)
        repeat_lex = len(reply_tri & _trigrams(earlier)) / len(reply_tri) if reply_tri else 0.0
        novel = len(_content_words(item.reply) - _content_words(earlier))
        return {
            "sim_background": sim_bg,
            "sim_last_user": sim_last,
            "sim_user_topics": sim_topics,
            "passive": passive,
            "repeat_semantic": repeat_sem,
            "repeat_lexical": repeat_lex,
            "novel_words": float(novel),
        }

    def _score_one(self, item: CriticInput) -> Score:
        f = self.features(item)
        passive_pen = _ramp(f["passive"], *self.PASSIVE_RANGE)
        repeat_pen = max(_ramp(f["repeat_semantic"], *self.REPEAT_RANGE), f["repeat_lexical"])
        keep = (1.0 - passive_pen) * (1.0 - repeat_pen)
        rel01 = _ramp(f["sim_background"], *self.REL_RANGE) * keep
        int01 = _ramp(0.6 * f["sim_last_user"] + 0.4 * f["sim_user_topics"], *self.INT_RANGE) * keep
        info01 = min(1.0, f["novel_words"] / self.NOVEL_WORDS_FULL)
        val01 = info01 * (0.5 + 0.5 * max(rel01, int01)) * keep
        expected = {"rel": 1 + 4 * rel01, "int": 1 + 4 * int01, "val": 1 + 4 * val01}
        ints = {d: _score_from_expected(expected[d]) for d in DIMENSIONS}
        reasons = self._reasons(item, ints, passive_pen, repeat_pen, f)
        return Score(
            **ints,
            reasons=reasons,
            raw=json.dumps(f),
            critic_model_id=self.model_id,
            expected=expected,
        )

    @staticmethod
    def _reasons(
        item: CriticInput,
        ints: dict[str, int],
        passive_pen: float,
        repeat_pen: float,
        f: dict[str, float],
    ) -> dict[str, str]:
        notes = []
        if passive_pen > 0.3:
            notes.append("it reads like a stock offer of help rather than a real reply")
        if repeat_pen > 0.3:
            notes.append("it repeats what was already said earlier")
        extra = ("; " + "; ".join(notes)) if notes else ""
        last = item.last_user_message[:80]
        reasons = {
            "rel": (
                f"it connects to {item.user_name}'s background"
                if ints["rel"] >= 4
                else f"it does not connect to {item.user_name}'s work, history or interests" + extra
            ),
            "int": (
                f"it builds on what {item.user_name} said"
                if ints["int"] >= 4
                else f'it does not pick up what {item.user_name} just said ("{last}")' + extra
            ),
            "val": (
                f"it adds {int(f['novel_words'])} new specific points"
                if ints["val"] >= 4
                else f"it adds little new, specific information ({int(f['novel_words'])} new "
                "content words)" + extra
            ),
        }
        return reasons


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


CriticBuilder = Callable[[Any, "ChatModel | None", Any], Critic]


def _build_rubric(settings: Any, model: ChatModel | None, embedder: Any) -> Critic:
    return RubricCritic(embedder if embedder is not None else Embedder())


def _build_embedding(settings: Any, model: ChatModel | None, embedder: Any) -> Critic:
    return EmbeddingCritic(embedder if embedder is not None else Embedder())


def _build_llm(settings: Any, model: ChatModel | None, embedder: Any) -> Critic:
    # A model exposing ``run_exclusive`` (the local backend) is read through its logits;
    # any other ``ChatModel`` (e.g. OpenAI-compatible) is a text judge.
    if model is None:
        raise ValueError("the llm critic needs a model (settings.critic)")
    if hasattr(model, "run_exclusive"):
        return LogitCritic.from_local_model(model)
    return TextJudgeCritic(model)


# The critics known by name. Another module adds its own by passing ``extra_builders`` to
# ``build_critic_kind`` (e.g. an evaluation critic), so this module never imports it.
CRITIC_BUILDERS: Mapping[str, CriticBuilder] = MappingProxyType(
    {"rubric": _build_rubric, "embedding": _build_embedding, "llm": _build_llm}
)


def build_critic_kind(
    kind: str,
    settings: Any,
    model: ChatModel | None = None,
    embedder: Any = None,
    *,
    extra_builders: Mapping[str, CriticBuilder] | None = None,
) -> Critic:
    """The critic called ``kind`` ("rubric", "embedding", "llm", or an extra one), cached."""
    builders = {**CRITIC_BUILDERS, **(extra_builders or {})}
    if kind not in builders:
        raise ValueError(f"unknown critic {kind!r}: use one of {', '.join(sorted(builders))}")
    return CachedCritic(builders[kind](settings, model, embedder))


def build_critic(settings: Any, model: ChatModel | None = None, embedder: Any = None) -> Critic:
    """The training critic chosen by ``settings.learner.critics.critic`` (default ``rubric``), cached."""
    return build_critic_kind(settings.learner.critics.critic, settings, model, embedder)
