"""The operator console: adapters, compare, A/B split, learner jobs, plots, dialogues, export.

`build_console()` adds its components to the current Blocks context (the hidden "Operator
console" tab). Every handler checks on the server that the caller is an admin before doing
anything; hiding the tab is only cosmetic. The data work lives in `ConsoleData`, so it is
usable (and testable) without the UI.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import shutil
import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr
from sqlalchemy import case, func, select

from chatbot.accounts import UserRecord
from chatbot.adapters import ABSplit, load_ab_split, save_ab_split
from core.types import BASE_ADAPTER, ChatMessage, GenerationParams
from learner import store as learner_store
from learner import train as learner_train
from personas import catalog as persona_catalog
from storage import corpus_models, job_models
from storage.models import Conversation, Feedback, Message, User

__all__ = [
    "AdapterRow",
    "ArmStats",
    "ConsoleData",
    "TurnView",
    "build_console",
    "require_admin",
]

log = logging.getLogger(__name__)

_ADMIN_ONLY = "Operators only."
_NA = "learner not available"
_DIMS = ("rel", "int", "val")
_ADAPTER_HEADERS = [
    "id",
    "parent",
    "iteration",
    "created",
    "training set",
    "val rel",
    "val int",
    "val val",
    "gate",
    "status",
]
_COMPARE_TURNS = 3
_AB_SAMPLE = 40
_JOBS = ("curriculum", "critique", "retrain")


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class AdapterRow:
    id: str
    parent: str
    iteration: str
    created: str
    training_set: str
    val_rel: str
    val_int: str
    val_val: str
    gate: str
    status: str

    def cells(self) -> list[str]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class ArmStats:
    arm: str
    adapter_id: str
    replies: int
    likes: int
    dislikes: int
    like_rate: float | None
    scored: int
    rel: float | None
    int: float | None
    val: float | None

    def cells(self) -> list[Any]:
        return [
            self.arm,
            self.adapter_id,
            self.replies,
            self.likes,
            self.dislikes,
            _fmt(self.like_rate),
            self.scored,
            _fmt(self.rel),
            _fmt(self.int),
            _fmt(self.val),
        ]


@dataclass(frozen=True)
class TurnView:
    seq: int
    role: str
    adapter_id: str
    status: str
    content: str
    feedback: str
    rel: str
    int: str
    val: str
    reasons: str

    def cells(self) -> list[Any]:
        return list(asdict(self).values())


# ------------------------------------------------------------------ helpers
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def require_admin(
    user_of: Callable[[Any, str | None], UserRecord], request: Any, browser_id: str | None
) -> UserRecord:
    """The calling user, if an admin; anyone else gets `gr.Error("Operators only.")`."""
    user = user_of(request, browser_id)
    if not user.is_admin:
        log.warning("console call refused for non-admin user %s", user.id)
        raise gr.Error(_ADMIN_ONLY)
    return user


# ------------------------------------------------------------------ data
class ConsoleData:
    """Everything the console reads and changes, on top of `Services`."""

    def __init__(self, services: Any):
        self.services = services
        self.settings = services.settings
        self.registry = services.registry
        self._critic: Any = None
        self._critic_lock = threading.Lock()
        self._compare_lock = threading.Lock()

    # -------------------------------------------------------------- adapters
    def adapter_rows(self) -> list[AdapterRow]:
        serving = self.services.adapters.active
        rows = [
            AdapterRow(
                BASE_ADAPTER,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "serving" if serving == BASE_ADAPTER else "available",
            )
        ]
        if self.registry is None:
            return rows
        for m in self.registry.list():
            gate = m.gate or {}
            means = (gate.get("candidate") or {}).get("means") or {}
            size = len(m.training_dialogue_ids) or (m.metrics or {}).get("examples")
            status = m.status + (" · serving" if m.id == serving else "")
            rows.append(
                AdapterRow(
                    id=m.id,
                    parent=m.parent_id or BASE_ADAPTER,
                    iteration=_fmt(m.iteration),
                    created=(m.created_at or "")[:19].replace("T", " "),
                    training_set=_fmt(size),
                    val_rel=_fmt(means.get("rel")),
                    val_int=_fmt(means.get("int")),
                    val_val=_fmt(means.get("val")),
                    gate=("promoted" if gate.get("promote") else "not promoted") if gate else "-",
                    status=status,
                )
            )
        return rows

    def adapter_ids(self, *, include_base: bool = True, usable: bool = False) -> list[str]:
        ids = [BASE_ADAPTER] if include_base else []
        if self.registry is not None:
            ids += [m.id for m in self.registry.list() if not (usable and m.status == "retired")]
        return ids

    def status_line(self) -> str:
        adapters = self.services.adapters
        swap = adapters.last_swap_s
        ab = getattr(adapters, "_ab", None)
        parts = [f"**Serving:** `{adapters.active}`"]
        if self.registry is not None:
            parts.append(f"registry active: `{self.registry.active_id()}`")
        if swap is not None:
            parts.append(f"last hot-swap {1000 * swap:.0f} ms")
        if ab is not None:
            parts.append(f"A/B: {100 * ab.share:.0f}% → `{ab.candidate}`")
        if adapters.last_error:
            parts.append(f"⚠️ {adapters.last_error}")
        return " · ".join(parts)

    def _need_registry(self) -> Any:
        if self.registry is None:
            raise gr.Error("The adapter registry is not available.")
        return self.registry

    def activate(self, adapter_id: str) -> float:
        """Activate in the registry and hot-load now; returns the swap time in seconds."""
        registry = self._need_registry()
        previous = registry.active_id()
        registry.activate(adapter_id, reason="activated in the operator console")
        try:
            return self.services.adapters.activate(adapter_id)
        except Exception:
            # The model could not load it: put the registry back so both agree.
            registry.activate(previous, reason=f"hot-load of {adapter_id} failed")
            raise

    def rollback(self) -> tuple[str, float]:
        registry = self._need_registry()
        target = registry.rollback(reason="rolled back in the operator console")
        return target, self.services.adapters.activate(target)

    def retire(self, adapter_id: str) -> None:
        if adapter_id == BASE_ADAPTER:
            raise gr.Error("The base model cannot be retired.")
        ab = load_ab_split(self.settings.adapters_dir)
        if ab is not None and ab.candidate == adapter_id:
            raise gr.Error("That adapter is the A/B candidate; turn the split off first.")
        self._need_registry().retire(adapter_id, reason="retired in the operator console")

    # -------------------------------------------------------------- critic
    def critic(self) -> Any:
        with self._critic_lock:
            if self._critic is None:
                from core.embeddings import Embedder
                from learner.critic import CachedCritic, EmbeddingCritic

                embedder = getattr(self.services.memory, "embedder", None) or Embedder()
                self._critic = CachedCritic(EmbeddingCritic(embedder))
            return self._critic

    def score(self, items: list[Any]) -> list[Any]:
        return self.critic().score_batch(items) if items else []

    # -------------------------------------------------------------- compare
    def _params(self) -> GenerationParams:
        from chatbot.services import generation_params

        return generation_params(self.settings)

    def _generate(self, messages: list[ChatMessage], adapter_id: str) -> str:
        adapter = None if adapter_id == BASE_ADAPTER else adapter_id
        return self.services.chatbot_model.generate(messages, self._params(), adapter=adapter).text

    @contextlib.contextmanager
    def _loaded(self, adapter_ids: list[str]):  # type: ignore[no-untyped-def]
        """Load adapters the model does not hold yet; unload them afterwards if unused."""
        model = self.services.chatbot_model
        loaded = getattr(model, "adapters", None)
        added: list[str] = []
        with self._compare_lock:
            try:
                for adapter_id in adapter_ids:
                    if adapter_id == BASE_ADAPTER or loaded is None or adapter_id in loaded:
                        continue
                    path = self._need_registry().verified_path(adapter_id)
                    model.load_adapter(adapter_id, path)
                    added.append(adapter_id)
                yield
            finally:
                ab = getattr(self.services.adapters, "_ab", None)
                for adapter_id in added:
                    busy = adapter_id == self.services.adapters.active or (
                        ab is not None and ab.candidate == adapter_id
                    )
                    if not busy:
                        model.unload_adapter(adapter_id)

    def compare_prompt(
        self, prompt: str, background: str, adapter_a: str, adapter_b: str
    ) -> list[dict[str, Any]]:
        """One user message to two adapters; returns per side the reply and its scores."""
        from core.prompting import load_prompt
        from learner.records import CriticInput

        text = (prompt or "").strip()
        if not text:
            raise gr.Error("Type a prompt to compare.")
        if len(text) > self.settings.limits.max_message_chars:
            raise gr.Error("That prompt is too long.")
        system = ChatMessage("system", load_prompt("upc_system"))
        out = []
        with self._loaded([adapter_a, adapter_b]):
            for adapter_id in (adapter_a, adapter_b):
                reply = self._generate([system, ChatMessage("user", text)], adapter_id)
                score = self.score(
                    [CriticInput("User", background or "", (("user", text),), reply)]
                )[0]
                out.append({"adapter": adapter_id, "turns": [(text, reply, score)]})
        return out

    def dialogue_choices(self, limit: int = 50) -> list[tuple[str, str]]:
        models = corpus_models
        if models is None:
            return []
        with self.services.db.session() as s:
            rows = s.execute(
                select(models.DialogueRow.id, models.DialogueRow.persona_name)
                .where(models.DialogueRow.status == "done")
                .order_by(models.DialogueRow.created_at.desc())
                .limit(limit)
            ).all()
        return [(f"{name or '?'} · {did[:8]}", did) for did, name in rows]

    def compare_replay(self, dialogue_id: str, adapter_a: str, adapter_b: str) -> list[dict]:
        """Replay a stored persona dialogue's user side; each adapter answers every turn."""
        from core.prompting import load_prompt
        from learner.records import CriticInput

        store_mod = learner_store
        models = corpus_models
        if store_mod is None or models is None:
            raise gr.Error(_NA)
        with self.services.db.session() as s:
            row = s.get(models.DialogueRow, dialogue_id or "")
            if row is None:
                raise gr.Error("Pick a stored persona dialogue to replay.")
            user_turns = [row.user_intro] + [t.user_answer for t in row.turns if t.user_answer]
            greeting, persona_id, name = row.greeting, row.persona_id, row.persona_name
        background = self._persona_background(persona_id)
        system = ChatMessage("system", load_prompt("upc_system"))
        out = []
        with self._loaded([adapter_a, adapter_b]):
            for adapter_id in (adapter_a, adapter_b):
                history: list[tuple[str, str]] = [("assistant", greeting)]
                turns = []
                for user_text in user_turns[:_COMPARE_TURNS]:
                    history.append(("user", user_text))
                    msgs = [system] + [ChatMessage(r, c) for r, c in history]
                    reply = self._generate(msgs, adapter_id)
                    score = self.score([CriticInput(name, background, tuple(history), reply)])[0]
                    turns.append((user_text, reply, score))
                    history.append(("assistant", reply))
                out.append({"adapter": adapter_id, "turns": turns})
        return out

    def _persona_background(self, persona_id: str) -> str:
        catalog_mod = persona_catalog
        if catalog_mod is None:
            return ""
        try:
            return (
                catalog_mod.PersonaCatalog.load(self.settings.data_dir).get(persona_id).background
            )
        except (KeyError, LookupError, ValueError, OSError):
            return ""

    # -------------------------------------------------------------- A/B
    def set_ab(self, candidate: str, share: float) -> ABSplit | None:
        if not 0.0 <= share <= 1.0:
            raise gr.Error("The share is a percentage from 0 to 100.")
        split = None
        if candidate and share > 0:
            if candidate == self.services.adapters.active:
                raise gr.Error("The candidate is already the serving adapter.")
            if candidate != BASE_ADAPTER:
                manifest = self._need_registry().verify(candidate)
                if manifest.status == "retired":
                    raise gr.Error(f"{candidate} is retired.")
            split = ABSplit(candidate, share)
        self.services.adapters.set_ab(split)
        save_ab_split(self.settings.adapters_dir, split)
        return split

    def arm_stats(self) -> list[ArmStats]:
        """Like rates and critic means of logged replies, per adapter of the current split."""
        from learner.records import CriticInput

        ab = load_ab_split(self.settings.adapters_dir)
        arms = [("control", self.services.adapters.active)]
        if ab is not None:
            arms.append(("candidate", ab.candidate))
        out = []
        with self.services.db.session() as s:
            for arm, adapter_id in arms:
                replies = s.scalar(
                    select(func.count(Message.id)).where(
                        Message.role == "assistant",
                        Message.adapter_id == adapter_id,
                        Message.status == "complete",
                    )
                )
                likes = s.scalar(
                    select(func.count(Feedback.id))
                    .join(Message, Message.id == Feedback.message_id)
                    .where(Message.adapter_id == adapter_id, Feedback.rating > 0)
                )
                dislikes = s.scalar(
                    select(func.count(Feedback.id))
                    .join(Message, Message.id == Feedback.message_id)
                    .where(Message.adapter_id == adapter_id, Feedback.rating < 0)
                )
                sample = s.scalars(
                    select(Message)
                    .where(
                        Message.role == "assistant",
                        Message.adapter_id == adapter_id,
                        Message.status == "complete",
                        Message.seq > 0,
                    )
                    .order_by(Message.created_at.desc())
                    .limit(_AB_SAMPLE)
                ).all()
                items = []
                for m in sample:
                    prior = s.scalars(
                        select(Message)
                        .where(
                            Message.conversation_id == m.conversation_id,
                            Message.seq < m.seq,
                            Message.status != "superseded",
                        )
                        .order_by(Message.seq)
                    ).all()
                    history = tuple((p.role, p.content) for p in prior[-6:])
                    items.append(CriticInput("User", "", history, m.content))
                scores = [sc for sc in self.score(items) if sc.scored]
                means = {
                    d: (statistics.fmean(sc.value(d) for sc in scores) if scores else None)
                    for d in _DIMS
                }
                rated = (likes or 0) + (dislikes or 0)
                out.append(
                    ArmStats(
                        arm=arm,
                        adapter_id=adapter_id,
                        replies=replies or 0,
                        likes=likes or 0,
                        dislikes=dislikes or 0,
                        like_rate=(likes / rated) if rated else None,
                        scored=len(scores),
                        rel=means["rel"],
                        int=means["int"],
                        val=means["val"],
                    )
                )
        return out

    # -------------------------------------------------------------- learner
    def _jobs_tables(self) -> Any:
        """`storage.job_models` (the scheduler's tables)."""
        return job_models

    def job_names(self) -> list[str]:
        names = list(_JOBS)
        tables = self._jobs_tables()
        if tables is not None:
            with self.services.db.session() as s:
                for table in (tables.JobControlRow, tables.JobProgressRow):
                    names += [n for n in s.scalars(select(table.job)) if n not in names]
        return names

    def learner_status(self) -> tuple[str, float]:
        """Markdown of the running (or last) jobs and the progress 0..1 of the current one."""
        lines = []
        progress = 0.0
        tables = self._jobs_tables()
        if tables is not None:
            with self.services.db.session() as s:
                rows = s.scalars(
                    select(tables.JobProgressRow).order_by(tables.JobProgressRow.updated_at.desc())
                ).all()
                for i, row in enumerate(rows):
                    if i == 0 or row.running:
                        state = "**running**" if row.running else "idle"
                        lines.append(
                            f"**Job** `{row.job}` {state} · {row.stage or '-'} · "
                            f"{row.done}/{row.total} · {100 * (row.fraction or 0):.0f}% · "
                            f"{row.message or ''} · updated {row.updated_at:%Y-%m-%d %H:%M:%S}"
                        )
                running = [r for r in rows if r.running]
                if running:
                    progress = float(running[0].fraction or 0.0)
        else:
            lines.append(f"⚠️ {_NA}: no job scheduler in this installation.")
        train = learner_train
        if train is not None:
            latest = train.TrainingStatusStore(self.services.db).latest()
            if latest is not None:
                if latest.status == "running" or not progress:
                    progress = max(progress, float(latest.progress or 0.0))
                loss = "-" if latest.loss is None else f"{latest.loss:.4f}"
                lines.append(
                    f"**Training** `{latest.run_id}` ({latest.stage}) **{latest.status}** · "
                    f"step {latest.step}/{latest.total_steps} · "
                    f"{100 * float(latest.progress or 0):.0f}% · loss {loss} · "
                    f"updated {latest.updated_at:%Y-%m-%d %H:%M:%S}"
                    + (f"\n\n⚠️ {latest.error}" if latest.error else "")
                )
        if not lines:
            lines.append("No learner job has run yet.")
        return "\n\n".join(lines), progress

    def job_history(self, limit: int = 50) -> list[list[Any]]:
        tables = self._jobs_tables()
        if tables is None:
            return []
        t = tables.JobRunRow
        with self.services.db.session() as s:
            runs = s.scalars(select(t).order_by(t.started_at.desc()).limit(limit)).all()
            return [
                [
                    r.job,
                    r.trigger,
                    r.status,
                    f"{r.started_at:%Y-%m-%d %H:%M:%S}",
                    f"{r.finished_at:%Y-%m-%d %H:%M:%S}" if r.finished_at else "-",
                    json.dumps(r.counts or {}),
                    r.error or "",
                ]
                for r in runs
            ]

    def _control(self, job: str, change: Callable[[Any], None]) -> None:
        """Record the operator's wish for a job; the active scheduler applies it."""
        from storage.models import utcnow

        tables = self._jobs_tables()
        if tables is None:
            raise gr.Error(f"{_NA}: no job scheduler in this installation.")
        if job not in self.job_names():
            raise gr.Error(f"Unknown job {job!r}.")
        with self.services.db.session() as s:
            row = s.get(tables.JobControlRow, job)
            if row is None:
                row = tables.JobControlRow(job=job, paused=False, version=0)
                s.add(row)
            change(row)
            row.version = (row.version or 0) + 1
            row.updated_at = utcnow()

    def job_action(self, action: str, job: str) -> str:
        from storage.models import utcnow

        def apply(row: Any) -> None:
            if action == "pause":
                row.paused = True
            elif action == "resume":
                row.paused = False
            elif action == "run_now":
                row.run_requested_at = utcnow()
            else:
                raise gr.Error(f"Unknown action {action!r}.")

        self._control(job, apply)
        done = {"pause": "paused", "resume": "resumed", "run_now": "asked to run now"}[action]
        return f"`{job}` {done}; the scheduler picks this up within seconds."

    def schedule_rows(self) -> list[list[Any]]:
        ls = self.settings.learner
        defaults = {
            "curriculum": ls.curriculum_interval_minutes,
            "critique": ls.critique_interval_minutes,
        }
        tables = self._jobs_tables()
        controls = {}
        if tables is not None:
            with self.services.db.session() as s:
                for row in s.scalars(select(tables.JobControlRow)):
                    controls[row.job] = (row.paused, row.kind, row.seconds, row.cron, row.source)
        out = []
        for job in self.job_names():
            if job in controls:
                paused, kind, seconds, cron, source = controls[job]
                every = (
                    cron
                    if kind == "cron"
                    else ("off" if kind == "off" or not seconds else f"{seconds / 60:g} min")
                )
                out.append([job, "paused" if paused else "active", every, source])
            else:
                minutes = defaults.get(job)
                every = (
                    "on new examples"
                    if minutes is None
                    else (f"{minutes} min" if minutes else "off")
                )
                out.append([job, "active", every, "settings"])
        return out

    def set_schedule(self, job: str, minutes: float) -> str:
        if minutes < 0:
            raise gr.Error("Intervals are 0 (off) or more minutes.")

        def apply(row: Any) -> None:
            row.kind = "interval" if minutes else "off"
            row.seconds = float(minutes) * 60.0
            row.cron = ""
            row.source = "operator"

        self._control(job, apply)
        return f"`{job}`: every {minutes:g} min." if minutes else f"`{job}`: off."

    # -------------------------------------------------------------- plots data
    def iteration_rows(self) -> list[dict[str, Any]]:
        """Per iteration: easy and regeneration rates, validation rel/int/val."""
        rows: dict[int, dict[str, Any]] = {}
        models = corpus_models
        if models is not None:
            with self.services.db.session() as s:
                for run in s.scalars(select(models.RunRow).order_by(models.RunRow.iteration)):
                    stats = run.stats or {}
                    rows[run.iteration] = {
                        "iteration": run.iteration,
                        "easy_rate": stats.get("easy_rate"),
                        "regeneration_rate": stats.get("regeneration_rate"),
                    }
        runs_dir = self.settings.runs_dir
        if runs_dir.is_dir():
            for state_file in sorted(runs_dir.glob("iter-*/state.json")):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    state = json.loads(state_file.read_text(encoding="utf-8"))
                    k = int(state["iteration"])
                    stats = {
                        **(state.get("generate_stats") or {}),
                        **(state.get("select_stats") or {}),
                    }
                    means = ((state.get("gate") or {}).get("candidate") or {}).get("means") or {}
                    row = rows.setdefault(k, {"iteration": k})
                    for key in ("easy_rate", "regeneration_rate"):
                        if row.get(key) is None:
                            row[key] = stats.get(key)
                    row.update({d: means.get(d) for d in _DIMS})
        if self.registry is not None:
            for m in self.registry.list():
                if m.iteration is None or not m.gate:
                    continue
                means = (m.gate.get("candidate") or {}).get("means") or {}
                row = rows.setdefault(m.iteration, {"iteration": m.iteration})
                for d in _DIMS:
                    if row.get(d) is None:
                        row[d] = means.get(d)
        return [rows[k] for k in sorted(rows)]

    def score_values(self) -> dict[str, list[float]]:
        models = corpus_models
        out: dict[str, list[float]] = {d: [] for d in _DIMS}
        if models is None:
            return out
        t = models.TurnRow
        with self.services.db.session() as s:
            for rel, int_, val in s.execute(select(t.final_rel, t.final_int, t.final_val)):
                for d, v in zip(_DIMS, (rel, int_, val), strict=True):
                    if v is not None:
                        out[d].append(float(v))
        return out

    def loss_history(self, adapter_id: str) -> list[dict[str, Any]]:
        if not adapter_id or adapter_id == BASE_ADAPTER:
            return []
        path = self._need_registry().path(adapter_id) / "loss.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return (
            [h for h in data if isinstance(h, dict) and "loss" in h]
            if isinstance(data, list)
            else []
        )

    # -------------------------------------------------------------- dialogues
    def conversation_rows(self, user_filter: str = "", limit: int = 200) -> list[list[Any]]:
        with self.services.db.session() as s:
            counts = (
                select(
                    Message.conversation_id,
                    func.count(Message.id).label("n"),
                    func.sum(case((Message.status == "superseded", 1), else_=0)).label("regen"),
                )
                .group_by(Message.conversation_id)
                .subquery()
            )
            query = (
                select(
                    Conversation,
                    User.username,
                    User.excluded_from_training,
                    counts.c.n,
                    counts.c.regen,
                )
                .join(User, User.id == Conversation.user_id)
                .outerjoin(counts, counts.c.conversation_id == Conversation.id)
                .order_by(Conversation.updated_at.desc())
                .limit(limit)
            )
            if user_filter.strip():
                query = query.where(User.username.contains(user_filter.strip()))
            return [
                [
                    c.id,
                    name,
                    "excluded" if excluded else "",
                    c.title,
                    f"{c.updated_at:%Y-%m-%d %H:%M}",
                    int(n or 0),
                    int(regen or 0),
                ]
                for c, name, excluded, n, regen in s.execute(query).all()
            ]

    def turns(self, conversation_id: str) -> tuple[str, list[TurnView]]:
        """Every message of a conversation (regenerated ones too), with critic scores."""
        from learner.records import CriticInput

        with self.services.db.session() as s:
            conv = s.get(Conversation, conversation_id or "")
            if conv is None:
                raise gr.Error("No such conversation.")
            user = s.get(User, conv.user_id)
            msgs = s.scalars(
                select(Message).where(Message.conversation_id == conv.id).order_by(Message.seq)
            ).all()
            feedback: dict[str, list[str]] = {}
            for fb in s.scalars(
                select(Feedback).where(Feedback.message_id.in_([m.id for m in msgs]))
            ):
                label = ("👍" if fb.rating > 0 else "👎") + (f" {fb.reason}" if fb.reason else "")
                feedback.setdefault(fb.message_id, []).append(label)
            rows = [(m.id, m.seq, m.role, m.adapter_id, m.status, m.content) for m in msgs]
            user_id, username = user.id, user.username
        background = ""
        memory = self.services.memory
        if memory is not None:
            with contextlib.suppress(Exception):
                background = memory.profile(user_id) or ""
        stored = self._logged_critiques([r[0] for r in rows])
        items, index = [], []
        kept: list[tuple[str, str]] = []
        for i, (mid, seq, role, _adapter, status, content) in enumerate(rows):
            if role == "assistant" and seq > 0 and content and mid not in stored:
                items.append(CriticInput(username, background, tuple(kept[-8:]), content))
                index.append(i)
            if status != "superseded":
                kept.append((role, content))
        scores = dict(zip(index, self.score(items), strict=True))
        for i, row in enumerate(rows):
            if row[0] in stored:
                scores[i] = stored[row[0]]
        views = []
        for i, (mid, seq, role, adapter, status, content) in enumerate(rows):
            sc = scores.get(i)
            views.append(
                TurnView(
                    seq=seq,
                    role=role,
                    adapter_id=adapter or "-",
                    status="regenerated (superseded)" if status == "superseded" else status,
                    content=content,
                    feedback=", ".join(feedback.get(mid, [])),
                    rel=_fmt(sc.rel) if sc else "",
                    int=_fmt(sc.int) if sc else "",
                    val=_fmt(sc.val) if sc else "",
                    reasons="; ".join(f"{k}: {v}" for k, v in sc.reasons.items()) if sc else "",
                )
            )
        return username, views

    def _logged_critiques(self, message_ids: list[str]) -> dict[str, Any]:
        """Scores the learner's logged-dialogue critique stored, with its regeneration."""
        from learner.records import Score

        tables = self._jobs_tables()
        if tables is None or not message_ids:
            return {}
        t = tables.LoggedTurnRow
        out = {}
        with self.services.db.session() as s:
            for row in s.scalars(select(t).where(t.message_id.in_(message_ids))):
                score = Score.from_dict(row.original_score)
                if row.regenerated:
                    score.reasons = {
                        **score.reasons,
                        "regenerated": f"({row.status}) {row.regenerated[:200]}",
                    }
                if row.exclusion_reason:
                    score.reasons = {**score.reasons, "excluded": row.exclusion_reason}
                out[row.message_id] = score
        return out

    def user_choices(self) -> list[str]:
        with self.services.db.session() as s:
            return list(s.scalars(select(User.username).order_by(User.username).limit(1000)))

    def set_excluded(self, username: str, excluded: bool) -> str:
        with self.services.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            if user is None:
                raise gr.Error("No such user.")
            user.excluded_from_training = bool(excluded)
        return f"{username}: {'excluded from' if excluded else 'included in'} training."

    def is_excluded(self, username: str) -> bool:
        with self.services.db.session() as s:
            return bool(
                s.scalar(select(User.excluded_from_training).where(User.username == username))
            )


# ------------------------------------------------------------------ plots
def _figure(width: float = 6.0, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_validation(rows: list[dict[str, Any]]) -> Any:
    """Validation rel/int/val per iteration as lines, the easy-sample rate as bars."""
    fig = _figure()
    ax = fig.add_subplot()
    ks = [r["iteration"] for r in rows]
    easy = [r.get("easy_rate") or 0.0 for r in rows]
    bars = ax.twinx()
    bars.bar(ks, easy, color="#cfd8dc", width=0.5, label="easy rate")
    bars.set_ylim(0, 1)
    bars.set_ylabel("easy-sample rate")
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    for d, color in zip(_DIMS, ("#1f77b4", "#d62728", "#2ca02c"), strict=True):
        pts = [(r["iteration"], r.get(d)) for r in rows if r.get(d) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=d)
    ax.set_ylim(1, 5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation score")
    ax.set_title("Validation scores and easy-sample rate" if rows else "No iterations yet")
    if rows:
        ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_regeneration(rows: list[dict[str, Any]]) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    pts = [(r["iteration"], r.get("regeneration_rate")) for r in rows]
    pts = [p for p in pts if p[1] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#9467bd")
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("regeneration rate")
    ax.set_title("Regeneration rate per iteration" if pts else "No iterations yet")
    fig.tight_layout()
    return fig


def plot_histograms(values: dict[str, list[float]]) -> Any:
    fig = _figure(7.5, 3.0)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, d in zip(axes, _DIMS, strict=True):
        ax.hist(values.get(d) or [], bins=[0.5, 1.5, 2.5, 3.5, 4.5, 5.5], color="#1f77b4")
        ax.set_title(f"{d} (n={len(values.get(d) or [])})")
        ax.set_xticks([1, 2, 3, 4, 5])
    axes[0].set_ylabel("replies")
    fig.tight_layout()
    return fig


def plot_loss(history: list[dict[str, Any]], adapter_id: str) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    for stage in sorted({str(h.get("stage", "sft")) for h in history}):
        pts = [
            (h.get("step", i), h["loss"])
            for i, h in enumerate(history)
            if str(h.get("stage", "sft")) == stage
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=stage)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss of {adapter_id}" if history else "No loss record for this adapter")
    if history:
        ax.legend()
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ export
def _parse_day(text: str | None, name: str) -> datetime | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise gr.Error(f"{name} must be a date like 2025-01-31.") from exc


def export_filters(
    source: str,
    since: str,
    until: str,
    users: str,
    adapter: str,
    min_score: float | None,
    max_score: float | None,
    feedback: str,
) -> Any:
    """The export library's filters from the console's form fields."""
    from learner.export import ExportFilters

    return ExportFilters(
        since=_parse_day(since, "From"),
        until=_parse_day(until, "Until"),
        users=tuple(u.strip() for u in (users or "").split(",") if u.strip()),
        adapters=tuple(a.strip() for a in (adapter or "").split(",") if a.strip()),
        min_score=min_score,
        max_score=max_score,
        sources=("real", "synthetic") if source in (None, "", "all") else (source,),
        feedback=feedback or "any",
    )


def export_for_download(
    services: Any, fmt: str, filters: Any, scrub: bool, progress: Any, downloads: Path
) -> tuple[Path, dict[str, Any]]:
    """Run one export, then copy its file out of the (blocked) data dir for Gradio to serve.

    The file is found again through `resolve_export_file`, which accepts only a file
    directly inside this export's directory: nothing a user types becomes a path.
    """
    from learner import export as lib

    def report(p: Any) -> None:
        if progress is not None:
            progress(min(1.0, p.messages / max(1, p.total_messages)), desc=p.phase)

    exports_dir = services.settings.exports_dir
    result = lib.export(
        services.db,
        exports_dir,
        lib.ExportOptions(formats=(fmt,), filters=filters, scrub=scrub),
        progress=report,
        runs_dir=services.settings.runs_dir,
    )
    produced = result.files.get("hf_zip") if fmt == "hf" else result.files.get(fmt)
    if produced is None:
        raise gr.Error("The export produced no file.")
    source = lib.resolve_export_file(exports_dir, result.export_id, Path(produced).name)
    for old in downloads.iterdir():  # only the latest export stays in the hand-over dir
        old.unlink(missing_ok=True)
    target = downloads / f"{result.export_id}-{source.name}"
    shutil.copyfile(source, target)
    return target, result.summary()


# ------------------------------------------------------------------ UI
def _render_compare(side: dict[str, Any]) -> str:
    parts = [f"### `{side['adapter']}`"]
    for user_text, reply, score in side["turns"]:
        scores = (
            " · ".join(f"{d} **{_fmt(score.value(d))}**" for d in _DIMS)
            if score.scored
            else "unscored"
        )
        parts.append(f"**User:** {user_text}\n\n**Bot:** {reply}\n\n{scores}")
    means = []
    for d in _DIMS:
        vals = [sc.value(d) for _, _, sc in side["turns"] if sc.scored]
        means.append(f"{d} {statistics.fmean(vals):.2f}" if vals else f"{d} -")
    parts.append("**Mean:** " + " · ".join(means))
    return "\n\n---\n\n".join(parts)


def build_console(services: Any, user_of: Callable[..., UserRecord], browser_id: Any) -> None:
    """Create the console in the current Blocks context; all handlers are admin-only."""
    data = ConsoleData(services)
    downloads = Path(tempfile.mkdtemp(prefix="upc-console-downloads-"))
    atexit.register(shutil.rmtree, downloads, ignore_errors=True)  # hand-over copies only
    outer = gr.context.get_render_context()

    with contextlib.suppress(Exception):
        # Keep the persisted A/B split across restarts; a bad adapter must not stop the app.
        services.adapters.set_ab(load_ab_split(services.settings.adapters_dir))

    def admin(request: gr.Request, bid: str | None) -> UserRecord:
        return require_admin(user_of, request, bid)

    def table(rows: list[Any]) -> list[list[Any]]:
        return [r.cells() for r in rows]

    try:
        initial = data.adapter_ids()
    except (OSError, ValueError) as exc:
        log.warning("cannot list adapters: %s", exc)
        initial = [BASE_ADAPTER]
    gr.Markdown("### Operator console", elem_id="console-title")
    status = gr.Markdown("", elem_id="console-status")
    with gr.Tabs():
        # ---------------------------------------------------------- adapters
        with gr.Tab("Adapters", id="console-adapters"):
            adapters_table = gr.Dataframe(
                headers=_ADAPTER_HEADERS, interactive=False, elem_id="console-adapters-table"
            )
            with gr.Row():
                adapter_pick = gr.Dropdown(
                    label="Adapter",
                    choices=initial,
                    value=BASE_ADAPTER,
                    elem_id="console-adapter-pick",
                    scale=3,
                    allow_custom_value=True,
                )
                confirm = gr.Checkbox(
                    label="Yes, I confirm", value=False, elem_id="console-confirm", scale=1
                )
            with gr.Row():
                refresh_btn = gr.Button("Refresh", elem_id="console-refresh")
                activate_btn = gr.Button("Activate", variant="primary", elem_id="console-activate")
                rollback_btn = gr.Button("Roll back", elem_id="console-rollback")
                retire_btn = gr.Button("Retire", variant="stop", elem_id="console-retire")
            action_note = gr.Markdown("", elem_id="console-action-note")
            gr.Markdown("#### Compare two adapters")
            with gr.Row():
                cmp_a = gr.Dropdown(
                    label="Left", choices=initial, value=BASE_ADAPTER, allow_custom_value=True
                )
                cmp_b = gr.Dropdown(
                    label="Right", choices=initial, value=BASE_ADAPTER, allow_custom_value=True
                )
            cmp_prompt = gr.Textbox(label="Prompt (one user message)", max_lines=4)
            cmp_background = gr.Textbox(
                label="Who the user is (for the critic; optional)",
                max_lines=3,
            )
            cmp_dialogue = gr.Dropdown(
                label="…or replay a stored persona dialogue", choices=[], allow_custom_value=True
            )
            with gr.Row():
                cmp_prompt_btn = gr.Button("Compare prompt")
                cmp_replay_btn = gr.Button("Replay dialogue")
            with gr.Row():
                cmp_left = gr.Markdown("")
                cmp_right = gr.Markdown("")
            gr.Markdown("#### A/B split of new conversations")
            with gr.Row():
                ab_candidate = gr.Dropdown(
                    label="Candidate", choices=initial, value=None, allow_custom_value=True
                )
                ab_share = gr.Slider(0, 100, value=0, step=5, label="Share of conversations (%)")
                ab_confirm = gr.Checkbox(label="Yes, I confirm", value=False)
            with gr.Row():
                ab_set_btn = gr.Button("Apply split")
                ab_stats_btn = gr.Button("Arm statistics")
            ab_table = gr.Dataframe(
                headers=[
                    "arm",
                    "adapter",
                    "replies",
                    "likes",
                    "dislikes",
                    "like rate",
                    "scored",
                    "rel",
                    "int",
                    "val",
                ],
                interactive=False,
            )
            ab_note = gr.Markdown("")
        # ---------------------------------------------------------- learner
        with gr.Tab("Learner", id="console-learner") as learner_tab:
            job_status = gr.Markdown("", elem_id="console-job")
            job_progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False)
            live = gr.Checkbox(label="Live updates", value=False)
            timer = gr.Timer(2.0, active=False)
            with gr.Row():
                job_name = gr.Dropdown(
                    label="Job",
                    choices=["curriculum", "critique", "retrain"],
                    value="curriculum",
                    allow_custom_value=True,
                )
                pause_btn = gr.Button("Pause")
                resume_btn = gr.Button("Resume")
                run_now_btn = gr.Button("Run now", variant="primary")
            with gr.Row():
                interval = gr.Number(label="Interval (minutes, 0 = off)", value=0, minimum=0)
                schedule_btn = gr.Button("Save schedule")
            schedule_note = gr.Markdown("")
            schedule_table = gr.Dataframe(
                headers=["job", "state", "every", "set by"], interactive=False
            )
            history_table = gr.Dataframe(
                headers=["job", "trigger", "status", "started", "finished", "counts", "error"],
                interactive=False,
            )
        # ---------------------------------------------------------- plots
        with gr.Tab("Plots", id="console-plots"):
            plots_btn = gr.Button("Draw plots")
            with gr.Row():
                validation_plot = gr.Plot(label="Validation rel/int/val and easy rate")
                regen_plot = gr.Plot(label="Regeneration rate")
            hist_plot = gr.Plot(label="Critic score histograms (final replies)")
            with gr.Row():
                loss_pick = gr.Dropdown(
                    label="Adapter", choices=initial[1:], scale=3, allow_custom_value=True
                )
                loss_btn = gr.Button("Show loss", scale=1)
            loss_plot = gr.Plot(label="Training loss")
        # ---------------------------------------------------------- dialogues
        with gr.Tab("Logged dialogues", id="console-dialogues"):
            with gr.Row():
                user_filter = gr.Textbox(label="User name contains", scale=3)
                list_btn = gr.Button("List conversations", scale=1)
            conv_table = gr.Dataframe(
                headers=[
                    "conversation",
                    "user",
                    "training",
                    "title",
                    "updated",
                    "messages",
                    "regenerations",
                ],
                interactive=False,
            )
            with gr.Row():
                conv_id = gr.Textbox(label="Conversation id", scale=3)
                open_btn = gr.Button("Open", scale=1)
            turns_title = gr.Markdown("")
            turns_table = gr.Dataframe(
                headers=[
                    "seq",
                    "role",
                    "adapter",
                    "status",
                    "content",
                    "feedback",
                    "rel",
                    "int",
                    "val",
                    "critic reasons",
                ],
                interactive=False,
                wrap=True,
            )
            with gr.Row():
                exclude_user = gr.Dropdown(
                    label="User", choices=[], scale=3, allow_custom_value=True
                )
                exclude_box = gr.Checkbox(label="Exclude this user's data from training")
                exclude_btn = gr.Button("Save", scale=1)
            exclude_note = gr.Markdown("")
        # ---------------------------------------------------------- export
        with gr.Tab("Export", id="console-export"):
            with gr.Row():
                exp_format = gr.Dropdown(
                    label="Format",
                    choices=["jsonl", "sharegpt", "parquet", "hf"],
                    value="jsonl",
                )
                exp_source = gr.Dropdown(
                    label="Source", choices=["all", "real", "synthetic", "regenerated"], value="all"
                )
                exp_scrub = gr.Checkbox(label="Scrub PII (for shared exports)", value=True)
            with gr.Row():
                exp_since = gr.Textbox(label="From (YYYY-MM-DD)")
                exp_until = gr.Textbox(label="Until (YYYY-MM-DD, exclusive)")
                exp_users = gr.Textbox(label="Users (comma-separated)")
                exp_adapter = gr.Textbox(label="Adapter ids (comma-separated)")
            with gr.Row():
                exp_min = gr.Number(label="Min mean critic score (1-5)", value=None)
                exp_max = gr.Number(label="Max mean critic score (1-5)", value=None)
                exp_feedback = gr.Dropdown(
                    label="Feedback", choices=["any", "liked", "disliked", "none"], value="any"
                )
            exp_btn = gr.Button("Export", variant="primary")
            exp_note = gr.Markdown("")
            exp_file = gr.File(label="Download", interactive=False)

    # ------------------------------------------------------------------ handlers
    def refresh(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        ids = data.adapter_ids()
        usable = data.adapter_ids(usable=True)
        candidates = [i for i in usable if i != services.adapters.active]
        return (
            table(data.adapter_rows()),
            gr.update(choices=ids),
            gr.update(choices=usable),
            gr.update(choices=usable),
            gr.update(choices=candidates),
            gr.update(choices=data.dialogue_choices()),
            gr.update(choices=ids[1:]),
            data.status_line(),
        )

    refresh_outputs = [
        adapters_table,
        adapter_pick,
        cmp_a,
        cmp_b,
        ab_candidate,
        cmp_dialogue,
        loss_pick,
        status,
    ]
    refresh_btn.click(refresh, [browser_id], refresh_outputs, api_name="console_refresh")
    if isinstance(outer, gr.Tab):
        outer.select(refresh, [browser_id], refresh_outputs, api_visibility="private")

    def after_change(note: str):  # type: ignore[no-untyped-def]
        return table(data.adapter_rows()), note, data.status_line(), False

    def unconfirmed(verb: str):  # type: ignore[no-untyped-def]
        # Nothing changes; a note rather than an error keeps the form usable.
        return gr.update(), f"⚠️ Tick 'Yes, I confirm' to {verb}.", gr.update(), False

    def on_activate(adapter_id: str, ok: bool, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        if not ok:
            return unconfirmed("activate")
        try:
            seconds = data.activate(adapter_id or BASE_ADAPTER)
        except (ValueError, OSError, RuntimeError) as exc:
            raise gr.Error(f"Not activated: {exc}") from exc
        return after_change(f"Activated `{adapter_id}` · hot-swap {1000 * seconds:.0f} ms")

    change_outputs = [adapters_table, action_note, status, confirm]
    activate_btn.click(
        on_activate,
        [adapter_pick, confirm, browser_id],
        change_outputs,
        api_name="console_activate",
        show_progress="minimal",
    )

    def on_rollback(ok: bool, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        if not ok:
            return unconfirmed("roll back")
        try:
            target, seconds = data.rollback()
        except (ValueError, OSError, RuntimeError) as exc:
            raise gr.Error(f"Not rolled back: {exc}") from exc
        return after_change(f"Rolled back to `{target}` · hot-swap {1000 * seconds:.0f} ms")

    rollback_btn.click(
        on_rollback,
        [confirm, browser_id],
        change_outputs,
        api_name="console_rollback",
        show_progress="minimal",
    )

    def on_retire(adapter_id: str, ok: bool, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        if not ok:
            return unconfirmed("retire")
        try:
            data.retire(adapter_id)
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Not retired: {exc}") from exc
        return after_change(f"Retired `{adapter_id}`.")

    retire_btn.click(
        on_retire,
        [adapter_pick, confirm, browser_id],
        change_outputs,
        api_name="console_retire",
        show_progress="minimal",
    )

    def on_compare(prompt: str, background: str, a: str, b: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        left, right = data.compare_prompt(prompt, background, a or BASE_ADAPTER, b or BASE_ADAPTER)
        return _render_compare(left), _render_compare(right)

    cmp_prompt_btn.click(
        on_compare,
        [cmp_prompt, cmp_background, cmp_a, cmp_b, browser_id],
        [cmp_left, cmp_right],
        api_name="console_compare",
        concurrency_limit=1,
    )

    def on_replay(dialogue_id: str, a: str, b: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        left, right = data.compare_replay(dialogue_id, a or BASE_ADAPTER, b or BASE_ADAPTER)
        return _render_compare(left), _render_compare(right)

    cmp_replay_btn.click(
        on_replay,
        [cmp_dialogue, cmp_a, cmp_b, browser_id],
        [cmp_left, cmp_right],
        api_name="console_replay",
        concurrency_limit=1,
    )

    def on_ab_set(candidate: str, share: float, ok: bool, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        if not ok:
            return "⚠️ Tick 'Yes, I confirm' to change the split.", gr.update(), False
        try:
            split = data.set_ab(candidate or "", float(share or 0) / 100.0)
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Split not changed: {exc}") from exc
        note = (
            f"{100 * split.share:.0f}% of new conversations go to `{split.candidate}`."
            if split
            else "A/B split is off."
        )
        return note, data.status_line(), False

    ab_set_btn.click(
        on_ab_set,
        [ab_candidate, ab_share, ab_confirm, browser_id],
        [ab_note, status, ab_confirm],
        api_name="console_ab_set",
        show_progress="minimal",
    )

    def on_ab_stats(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        return table(data.arm_stats())

    ab_stats_btn.click(on_ab_stats, [browser_id], [ab_table], api_name="console_ab_stats")

    def on_learner(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        text, progress = data.learner_status()
        return (
            text,
            round(100 * progress, 1),
            data.job_history(),
            data.schedule_rows(),
            gr.update(choices=data.job_names()),
        )

    learner_outputs = [job_status, job_progress, history_table, schedule_table, job_name]
    learner_tab.select(on_learner, [browser_id], learner_outputs, api_name="console_learner")

    def on_live(on: bool, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        return gr.Timer(active=bool(on))

    live.input(on_live, [live, browser_id], [timer], api_name="console_live")

    def on_tick(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        text, progress = data.learner_status()
        return text, round(100 * progress, 1)

    timer.tick(on_tick, [browser_id], [job_status, job_progress], api_name="console_tick")

    def job_handler(action: str):  # type: ignore[no-untyped-def]
        def handler(job: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
            admin(request, bid)
            note = data.job_action(action, job or "")
            return note, data.job_history(), data.schedule_rows()

        return handler

    for button, action in ((pause_btn, "pause"), (resume_btn, "resume"), (run_now_btn, "run_now")):
        button.click(
            job_handler(action),
            [job_name, browser_id],
            [schedule_note, history_table, schedule_table],
            api_name=f"console_{action}",
        )

    def on_schedule(job: str, minutes: float, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        return data.set_schedule(job or "", float(minutes or 0)), data.schedule_rows()

    schedule_btn.click(
        on_schedule,
        [job_name, interval, browser_id],
        [schedule_note, schedule_table],
        api_name="console_schedule",
    )

    def on_plots(bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        rows = data.iteration_rows()
        return plot_validation(rows), plot_regeneration(rows), plot_histograms(data.score_values())

    plots_btn.click(
        on_plots, [browser_id], [validation_plot, regen_plot, hist_plot], api_name="console_plots"
    )

    def on_loss(adapter_id: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        try:
            return plot_loss(data.loss_history(adapter_id or ""), adapter_id or "")
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc

    loss_btn.click(on_loss, [loss_pick, browser_id], [loss_plot], api_name="console_loss")

    def on_list(text: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        return data.conversation_rows(text or ""), gr.update(choices=data.user_choices())

    list_btn.click(
        on_list,
        [user_filter, browser_id],
        [conv_table, exclude_user],
        api_name="console_conversations",
    )

    def on_open(cid: str, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        username, views = data.turns((cid or "").strip())
        return (
            f"**{username}** · {sum(v.role == 'assistant' for v in views)} bot turns",
            table(views),
            gr.update(choices=data.user_choices(), value=username),
            data.is_excluded(username),
        )

    open_btn.click(
        on_open,
        [conv_id, browser_id],
        [turns_title, turns_table, exclude_user, exclude_box],
        api_name="console_open",
    )

    def on_exclude(username: str, excluded: bool, bid: str, request: gr.Request):  # type: ignore[no-untyped-def]
        admin(request, bid)
        return data.set_excluded(username or "", bool(excluded))

    exclude_btn.click(
        on_exclude,
        [exclude_user, exclude_box, browser_id],
        [exclude_note],
        api_name="console_exclude",
    )

    def on_export(
        fmt: str,
        source: str,
        scrub: bool,
        since: str,
        until: str,
        users: str,
        adapter: str,
        min_score: float | None,
        max_score: float | None,
        feedback: str,
        bid: str,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress tracker
    ):  # type: ignore[no-untyped-def]
        admin(request, bid)
        filters = export_filters(
            source, since, until, users, adapter, min_score, max_score, feedback
        )
        try:
            path, summary = export_for_download(
                services, fmt, filters, bool(scrub), progress, downloads
            )
        except (ValueError, OSError) as exc:
            raise gr.Error(f"Export failed: {exc}") from exc
        note = (
            f"Exported {summary['conversations']} conversations, {summary['messages']} "
            f"messages in {summary['duration_s']} s · PII scrubbing "
            f"{'on' if summary['scrub_enabled'] else 'off'}: {summary['scrubbed_total']} "
            f"replacements {json.dumps(summary['scrubbed'])}"
        )
        return note, str(path)

    exp_btn.click(
        on_export,
        [
            exp_format,
            exp_source,
            exp_scrub,
            exp_since,
            exp_until,
            exp_users,
            exp_adapter,
            exp_min,
            exp_max,
            exp_feedback,
            browser_id,
        ],
        [exp_note, exp_file],
        api_name="console_export",
        concurrency_limit=1,
    )
