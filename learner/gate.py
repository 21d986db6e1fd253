"""The promotion gate: a candidate adapter replaces the active one only if it scores better.

Both are evaluated on the same validation users with the same seeds (2 by default) and
the same critic (the evaluation critic, which training never sees), T turns each, without
regeneration. The comparison is paired: per-user mean scores, candidate minus baseline,
with a bootstrap over users. Promotion needs the 95% lower bound of that gain above the
margin AND no critic-free check (truncation, meta-text, placeholders, echo, distinct-2,
traits revealed, ...) worse than its tolerance. `decide` is a pure function of the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.types import BASE_ADAPTER, ChatModel
from learner.adapter_manifest import atomic_write
from learner.checks import CheckRegression, CriticFreeChecks, regressions
from learner.critic import Critic
from learner.generate import run_dialogues
from learner.records import DIMENSIONS, DialogueRecord, PersonaLike
from learner.registry import AdapterError, AdapterRegistry
from learner.stats import PairedCI, paired_bootstrap, per_user_means
from storage.adapter_models import GateEvaluationRow

__all__ = [
    "GateDecision",
    "ScoreSet",
    "decide",
    "ensure_adapter",
    "record_decision",
    "run_gate",
    "run_variant",
    "write_gate_transcripts",
]

log = logging.getLogger(__name__)

_EPS = 1e-9

# run_dialogues(chatbot, user_model, critic, personas, *, turns, regenerate, adapter, seed)
DialogueRunner = Callable[..., Sequence[DialogueRecord]]
# Critic-free checks of one system's dialogues (learner.checks.critic_free_checks, bound).
ChecksFn = Callable[[Sequence[DialogueRecord]], CriticFreeChecks]


@dataclass(frozen=True)
class ScoreSet:
    """Per-reply critic scores of one model variant on the validation users."""

    adapter_id: str
    rel: tuple[float, ...] = ()
    int: tuple[float, ...] = ()  # the method's name for the interest dimension
    val: tuple[float, ...] = ()
    unscored: int = 0
    dialogues: int = 0
    # Persona id -> mean score over its dialogues (all seeds): the unit of the paired test.
    per_user: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_dialogues(cls, adapter_id: str, dialogues: Iterable[DialogueRecord]) -> ScoreSet:
        values: dict[str, list[float]] = {d: [] for d in DIMENSIONS}
        unscored = n = 0
        dialogues = list(dialogues)
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
            per_user=tuple(sorted(per_user_means(dialogues).items())),
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
    critic_id: str = ""
    # The paired test: 95% bootstrap interval of the per-user gain, and how many users.
    lower: float | None = None
    upper: float | None = None
    n_users: int = 0
    seeds: tuple[int, ...] = ()
    regressions: tuple[dict[str, Any], ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)
    # The JSONL of both sides' dialogues with their scores ("" when none was written).
    transcripts: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def unchecked(cls, candidate_id: str, baseline_id: str, reason: str) -> GateDecision:
        """A promotion without evaluation (`upc learn iterate --no-gate`)."""
        return cls(
            promote=True,
            candidate_id=candidate_id,
            baseline_id=baseline_id,
            candidate_mean=None,
            baseline_mean=None,
            delta=None,
            margin=0.0,
            reason=reason,
            candidate={},
            baseline={},
        )


def _fmt_means(means: dict[str, float | None]) -> str:
    return " ".join(f"{d}={'n/a' if v is None else f'{v:.3f}'}" for d, v in means.items())


def decide(
    candidate: ScoreSet,
    baseline: ScoreSet,
    margin: float,
    *,
    paired: PairedCI | None = None,
    regressed: Sequence[CheckRegression] = (),
    critic_id: str = "",
) -> GateDecision:
    """Promote iff the paired 95% lower bound of the gain exceeds ``margin`` and no
    critic-free check regressed. ``paired`` defaults to the bootstrap of the two sets'
    per-user means."""
    c, b = candidate.overall, baseline.overall
    if paired is None:
        paired = paired_bootstrap(dict(candidate.per_user), dict(baseline.per_user))
    common = {
        "candidate_id": candidate.adapter_id,
        "baseline_id": baseline.adapter_id,
        "candidate_mean": c,
        "baseline_mean": b,
        "margin": margin,
        "candidate": candidate.summary(),
        "baseline": baseline.summary(),
        "critic_id": critic_id,
        "lower": paired.lo,
        "upper": paired.hi,
        "n_users": paired.n_users,
        "regressions": tuple(asdict(r) for r in regressed),
    }
    if c is None:
        return GateDecision(
            promote=False,
            delta=None,
            reason=f"candidate {candidate.adapter_id} has no scored replies "
            f"({candidate.unscored} unscored); it stays a candidate",
            **common,
        )
    if b is None or paired.lo is None or paired.mean_diff is None:
        return GateDecision(
            promote=False,
            delta=None,
            reason=f"baseline {baseline.adapter_id} has no scored replies for the same users; "
            "cannot compare",
            **common,
        )
    delta = paired.mean_diff
    gain_ok = paired.lo > margin - _EPS
    promote = gain_ok and not regressed
    verdict = "promoted" if promote else "not promoted"
    why = (
        f"paired gain {delta:+.3f} over {paired.n_users} users, 95% CI "
        f"[{paired.lo:+.3f}, {paired.hi:+.3f}], lower bound {'>' if gain_ok else '<='} "
        f"margin {margin:.3f}"
    )
    if regressed:
        why += "; critic-free checks regressed: " + ", ".join(
            f"{r.label} {r.base:.3f} -> {r.candidate:.3f}" for r in regressed
        )
    reason = (
        f"{verdict}: {why}; mean(rel,int,val) {c:.3f} vs {b:.3f} for {baseline.adapter_id}; "
        f"candidate {_fmt_means(candidate.means())}; baseline {_fmt_means(baseline.means())}"
    )
    return GateDecision(promote=promote, delta=delta, reason=reason, **common)


def run_variant(
    chatbot: ChatModel,
    user_model: ChatModel,
    critic: Critic,
    personas: Sequence[PersonaLike],
    *,
    adapter: str,
    seeds: Sequence[int],
    turns: int = 5,
    runner: DialogueRunner | None = None,
) -> list[DialogueRecord]:
    """T-turn dialogues (no regeneration) with one adapter, one per user and seed.

    All of them run in one lockstep batch: each seed after the first is a copy of every
    user, and a copy samples from its own row seeds (`learner.generate`), so the copies are
    the independent samples that separate seeds would be, and both adapters get the same
    ones."""
    if runner is None:
        runner = run_dialogues
    copies = [p for _ in seeds for p in personas]
    return list(
        runner(
            chatbot,
            user_model,
            critic,
            copies,
            turns=turns,
            regenerate=False,
            adapter=None if adapter == BASE_ADAPTER else adapter,
            seed=seeds[0],
            batch_size=max(1, len(copies)),  # every dialogue in flight at once
        )
    )


def write_gate_transcripts(
    path: Path, seeds: Sequence[int], n_users: int, sides: dict[str, list[DialogueRecord]]
) -> Path:
    """One line per dialogue: side (candidate / baseline), adapter, seed, user and the whole
    `DialogueRecord` with the gate critic's scores; written whole, then renamed."""
    rows = [
        {
            "side": side,
            "adapter": record.adapter or BASE_ADAPTER,
            "seed": seeds[min(k // max(n_users, 1), len(seeds) - 1)],
            "persona_id": record.persona_id,
            "dialogue": asdict(record),
        }
        for side, dialogues in sides.items()
        for k, record in enumerate(dialogues)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return path


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
        "lower": decision.lower,
        "upper": decision.upper,
        "n_users": decision.n_users,
        "critic_id": decision.critic_id,
        "regressions": [r["key"] for r in decision.regressions],
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
                details={
                    "candidate": decision.candidate,
                    "baseline": decision.baseline,
                    "paired": {"lower": decision.lower, "upper": decision.upper},
                    "n_users": decision.n_users,
                    "seeds": list(decision.seeds),
                    "critic_id": decision.critic_id,
                    "regressions": list(decision.regressions),
                    "checks": decision.checks,
                },
            )
        )


def ensure_adapter(chatbot: ChatModel, registry: AdapterRegistry, adapter_id: str) -> None:
    """Load a verified adapter into a local chatbot once (the base needs none)."""
    if adapter_id == BASE_ADAPTER or not hasattr(chatbot, "load_adapter"):
        return
    if adapter_id in getattr(chatbot, "adapters", ()):
        return
    chatbot.load_adapter(adapter_id, registry.verified_path(adapter_id))


def run_gate(
    registry: AdapterRegistry,
    candidate_id: str,
    *,
    chatbot: ChatModel,
    user_model: ChatModel,
    critic: Critic,
    personas: Sequence[PersonaLike],
    margin: float,
    seed: int,
    n_seeds: int = 2,
    turns: int = 5,
    iteration: int | None = None,
    promote: bool = True,
    runner: DialogueRunner | None = None,
    checks: ChecksFn | None = None,
    tolerance: float = 0.10,
    transcripts_dir: Path | None = None,
) -> GateDecision:
    """Evaluate candidate vs the active adapter (or base), paired on the same users and
    seeds; record the decision and its numbers, and promote if it wins. With
    ``transcripts_dir`` both sides' dialogues are kept there, one JSONL per gate."""
    baseline_id = registry.active_id()
    if baseline_id == candidate_id:
        raise AdapterError(f"{candidate_id} is already the active adapter")
    registry.verify(candidate_id)
    ensure_adapter(chatbot, registry, candidate_id)
    ensure_adapter(chatbot, registry, baseline_id)
    seeds = tuple(seed + k for k in range(max(1, n_seeds)))
    kwargs = {"seeds": seeds, "turns": turns, "runner": runner}
    # Both sides at once: on the local backend their decode steps share batches.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gate") as pool:
        sides = [
            pool.submit(run_variant, chatbot, user_model, critic, personas, adapter=a, **kwargs)
            for a in (candidate_id, baseline_id)
        ]
        cand_dialogues, base_dialogues = (side.result() for side in sides)
    cand = ScoreSet.from_dialogues(candidate_id, cand_dialogues)
    base = ScoreSet.from_dialogues(baseline_id, base_dialogues)
    regressed: list[CheckRegression] = []
    check_values: dict[str, Any] = {}
    if checks is not None:
        cand_checks, base_checks = checks(cand_dialogues), checks(base_dialogues)
        regressed = regressions(base_checks, cand_checks, tolerance)
        check_values = {"candidate": asdict(cand_checks), "baseline": asdict(base_checks)}
    decision = decide(
        cand, base, margin, regressed=regressed, critic_id=str(getattr(critic, "model_id", ""))
    )
    transcripts = ""
    if transcripts_dir is not None:
        written = write_gate_transcripts(
            Path(transcripts_dir) / f"{candidate_id}-vs-{baseline_id}.jsonl",
            seeds,
            len(personas),
            {"candidate": cand_dialogues, "baseline": base_dialogues},
        )
        transcripts = str(written)
    decision = dataclasses.replace(
        decision, seeds=seeds, checks=check_values, transcripts=transcripts
    )
    record_decision(registry, decision, iteration=iteration)
    log.info("gate for %s: %s", candidate_id, decision.reason)
    if decision.promote and promote:
        registry.activate(candidate_id, reason=decision.reason, action="promote")
    return decision
