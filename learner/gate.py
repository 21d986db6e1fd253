"""The promotion gate: a candidate adapter replaces the active one only if it scores better.

Both are evaluated on the same validation users with the same simulated-user seeds and the
same critic, T turns each, without regeneration (method.md section 6: every reply after the
greeting is scored). The decision itself is `decide`, a pure function of two score sets.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chatbot.types import BASE_ADAPTER
from learner.records import DIMENSIONS, DialogueRecord
from learner.registry import AdapterError, AdapterRegistry
from storage.adapter_models import GateEvaluationRow

__all__ = [
    "GateDecision",
    "ScoreSet",
    "decide",
    "evaluate_adapter",
    "record_decision",
    "run_gate",
]

log = logging.getLogger(__name__)

_EPS = 1e-9

# run_dialogues(chatbot, user_model, critic, personas, *, turns, regenerate, adapter, seed)
DialogueRunner = Callable[..., Sequence[DialogueRecord]]


@dataclass(frozen=True)
class ScoreSet:
    """Per-reply critic scores of one model variant on the validation users."""

    adapter_id: str
    rel: tuple[float, ...] = ()
    int: tuple[float, ...] = ()  # the method's name for the interest dimension
    val: tuple[float, ...] = ()
    unscored: int = 0
    dialogues: int = 0

    @classmethod
    def from_dialogues(cls, adapter_id: str, dialogues: Iterable[DialogueRecord]) -> ScoreSet:
        values: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
        unscored = n = 0
        for dialogue in dialogues:
            n += 1
            for turn in dialogue.turns:
                score = turn.final_score
                if not score.scored:
                    unscored += 1
                    continue
                for dim in DIMENSIONS:
                    values[dim].append(float(score.value(dim)))  # type: ignore[arg-type]
        return cls(
            adapter_id,
            rel=tuple(values["rel"]),
            int=tuple(values["int"]),
            val=tuple(values["val"]),
            unscored=unscored,
            dialogues=n,
        )

    @property
    def replies(self) -> int:
        return len(self.rel)

    def means(self) -> dict[str, float | None]:
        return {
            d: (statistics.fmean(getattr(self, d)) if getattr(self, d) else None)
            for d in DIMENSIONS
        }

    @property
    def overall(self) -> float | None:
        """mean(rel, int, val): the gate's single number."""
        means = self.means()
        if any(v is None for v in means.values()):
            return None
        return statistics.fmean(means.values())  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        return {
            "adapter_id": self.adapter_id,
            "means": self.means(),
            "overall": self.overall,
            "replies": self.replies,
            "unscored": self.unscored,
            "dialogues": self.dialogues,
        }


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_id: str
    baseline_id: str
    candidate_mean: float | None
    baseline_mean: float | None
    delta: float | None
    margin: float
    reason: str
    candidate: dict[str, Any]
    baseline: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt_means(means: dict[str, float | None]) -> str:
    return " ".join(f"{d}={'n/a' if v is None else f'{v:.3f}'}" for d, v in means.items())


def decide(candidate: ScoreSet, baseline: ScoreSet, margin: float) -> GateDecision:
    """Promote iff mean(rel,int,val) of the candidate - that of the baseline >= margin."""
    c, b = candidate.overall, baseline.overall
    common = {
        "candidate_id": candidate.adapter_id,
        "baseline_id": baseline.adapter_id,
        "candidate_mean": c,
        "baseline_mean": b,
        "margin": margin,
        "candidate": candidate.summary(),
        "baseline": baseline.summary(),
    }
    if c is None:
        return GateDecision(
            promote=False,
            delta=None,
            reason=f"candidate {candidate.adapter_id} has no scored replies "
            f"({candidate.unscored} unscored); it stays a candidate",
            **common,
        )
    if b is None:
        return GateDecision(
            promote=False,
            delta=None,
            reason=f"baseline {baseline.adapter_id} has no scored replies; cannot compare",
            **common,
        )
    delta = c - b
    promote = delta >= margin - _EPS
    verdict = "promoted" if promote else "not promoted"
    reason = (
        f"{verdict}: mean(rel,int,val) {c:.3f} vs {b:.3f} for {baseline.adapter_id} "
        f"(delta {delta:+.3f} {'>=' if promote else '<'} margin {margin:.3f}); "
        f"candidate {_fmt_means(candidate.means())}; baseline {_fmt_means(baseline.means())}"
    )
    return GateDecision(promote=promote, delta=delta, reason=reason, **common)


def evaluate_adapter(
    chatbot: Any,
    user_model: Any,
    critic: Any,
    personas: Sequence[Any],
    *,
    adapter: str,
    seed: int,
    turns: int = 5,
    runner: DialogueRunner | None = None,
) -> ScoreSet:
    """Run T-turn dialogues (no regeneration) with one adapter and collect the critic's scores."""
    if runner is None:
        from learner.generate import run_dialogues as runner
    dialogues = runner(
        chatbot,
        user_model,
        critic,
        personas,
        turns=turns,
        regenerate=False,
        adapter=None if adapter == BASE_ADAPTER else adapter,
        seed=seed,
    )
    return ScoreSet.from_dialogues(adapter, dialogues)


def record_decision(
    registry: AdapterRegistry, decision: GateDecision, *, iteration: int | None = None
) -> None:
    """Store the evaluation in the candidate's manifest and in `gate_evaluations`."""
    manifest = registry.get(decision.candidate_id)
    metrics = dict(manifest.metrics)
    metrics["gate"] = {
        "candidate_mean": decision.candidate_mean,
        "baseline_mean": decision.baseline_mean,
        "delta": decision.delta,
        "promoted": decision.promote,
    }
    registry.update_manifest(
        decision.candidate_id,
        gate=decision.to_dict(),
        metrics=metrics,
        status_reason=decision.reason if manifest.status == "candidate" else manifest.status_reason,
    )
    with registry.db.session() as session:
        session.add(
            GateEvaluationRow(
                candidate_id=decision.candidate_id,
                baseline_id=decision.baseline_id,
                iteration=iteration,
                candidate_mean=decision.candidate_mean,
                baseline_mean=decision.baseline_mean,
                delta=decision.delta,
                margin=decision.margin,
                promoted=decision.promote,
                reason=decision.reason,
                details={"candidate": decision.candidate, "baseline": decision.baseline},
            )
        )


def _ensure_loaded(chatbot: Any, registry: AdapterRegistry, adapter_id: str) -> None:
    if adapter_id == BASE_ADAPTER or not hasattr(chatbot, "load_adapter"):
        return
    if adapter_id in getattr(chatbot, "adapters", ()):
        return
    chatbot.load_adapter(adapter_id, registry.verified_path(adapter_id))


def run_gate(
    registry: AdapterRegistry,
    candidate_id: str,
    *,
    chatbot: Any,
    user_model: Any,
    critic: Any,
    personas: Sequence[Any],
    margin: float,
    seed: int,
    turns: int = 5,
    iteration: int | None = None,
    promote: bool = True,
    runner: DialogueRunner | None = None,
) -> GateDecision:
    """Evaluate candidate vs the active adapter (or base), record, and promote if it wins."""
    baseline_id = registry.active_id()
    if baseline_id == candidate_id:
        raise AdapterError(f"{candidate_id} is already the active adapter")
    registry.verify(candidate_id)
    _ensure_loaded(chatbot, registry, candidate_id)
    _ensure_loaded(chatbot, registry, baseline_id)
    kwargs = {"seed": seed, "turns": turns, "runner": runner}
    cand = evaluate_adapter(chatbot, user_model, critic, personas, adapter=candidate_id, **kwargs)
    base = evaluate_adapter(chatbot, user_model, critic, personas, adapter=baseline_id, **kwargs)
    decision = decide(cand, base, margin)
    record_decision(registry, decision, iteration=iteration)
    log.info("gate for %s: %s", candidate_id, decision.reason)
    if decision.promote and promote:
        registry.activate(candidate_id, reason=decision.reason, action="promote")
    return decision
