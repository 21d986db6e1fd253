"""Outputs of an evaluation: report.json, report.md, report.png and transcripts.jsonl.

``transcripts.jsonl`` holds one line per dialogue (every system, user and seed): the user
(name and background), the seed index, the whole ``DialogueRecord`` (whose turns carry the
training critic's scores) and the evaluation critic's scores of its replies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from learner.checks import CHECKS
from learner.eval_records import METRIC_LABELS, SCORE_KEYS, CriticView, EvalReport
from learner.metrics import MeanCI
from learner.stats import PairedCI

__all__ = ["TRANSCRIPTS", "TranscriptRow", "read_transcripts", "to_markdown", "write_outputs"]

TRANSCRIPTS = "transcripts.jsonl"


@dataclass(frozen=True)
class TranscriptRow:
    """One line of transcripts.jsonl."""

    system: str
    persona_id: str
    persona_name: str
    background: str
    seed: int
    train_critic_id: str
    eval_critic_id: str
    dialogue: dict[str, Any]  # asdict(DialogueRecord)
    eval_scores: list[dict[str, Any]]  # one Score dict per turn

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_transcripts(path: str | Path) -> list[TranscriptRow]:
    """Rows of a transcripts.jsonl (or of the one inside a report directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRANSCRIPTS
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(TranscriptRow(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path}, line {number}: not a transcript row ({exc})") from exc
    return rows


def _transcript_rows(report: EvalReport) -> list[TranscriptRow]:
    rows = []
    for name, run in report.runs.items():
        for record, persona, seed, scores in zip(
            run.records, run.personas, run.seeds, run.eval_scores, strict=True
        ):
            rows.append(
                TranscriptRow(
                    system=name,
                    persona_id=persona.id,
                    persona_name=persona.name,
                    background=persona.background,
                    seed=seed,
                    train_critic_id=report.train_critic_id,
                    eval_critic_id=report.eval_critic_id,
                    dialogue=asdict(record),
                    eval_scores=[s.to_dict() for s in scores],
                )
            )
    return rows


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci: MeanCI | None, digits: int = 3) -> str:
    if ci is None or ci.mean is None:
        return "n/a"
    if ci.low is None or ci.high is None:
        return _fmt(ci.mean, digits)
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def _fmt_pct(ci: MeanCI) -> str:
    if ci.mean is None:
        return "n/a"
    return f"{100 * ci.mean:.1f}% [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"  # type: ignore[operator]


def _fmt_paired(ci: PairedCI | None) -> str:
    if ci is None or ci.mean_diff is None:
        return "n/a"
    gain = f", {100 * ci.relative_gain:+.1f}%" if ci.relative_gain is not None else ""
    mark = " *" if ci.significant else ""
    return f"{ci.mean_diff:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]{gain}{mark}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _critic_section(report: EvalReport, which: str, title: str, conf: int) -> list[str]:
    lines = ["", f"## {title}, per-user mean [{conf}% CI]", ""]
    rows = []
    for s in report.systems:
        view: CriticView = getattr(s, which)
        fit = view.aloe.get("mean")
        rows.append(
            [
                s.name,
                *(_fmt_ci(view.scores.get(k)) for k in SCORE_KEYS),
                _fmt(fit.ir if fit else None),
                _fmt(fit.n_ir if fit else None),
                _fmt(fit.r2 if fit else None),
                f"{view.unscored}/{view.replies}",
            ]
        )
    header = ["system", "rel", "int", "val", "mean", "IR", "N-IR", "R²", "unscored"]
    lines += _table(header, rows)
    others = [s for s in report.systems if getattr(s, which).vs_base is not None]
    if others:
        lines += ["", f"Difference to `{report.base_system}` (paired user bootstrap):", ""]
        rows = [
            [s.name, *(_fmt_paired(getattr(s, which).vs_base.get(k)) for k in SCORE_KEYS)]
            for s in others
        ]
        lines += _table(["system", *(f"Δ {k}" for k in SCORE_KEYS)], rows)
    return lines


def _checks_section(report: EvalReport) -> list[str]:
    lines = ["", "## Critic-free checks", ""]
    keys = list(CHECKS)
    rows = []
    for s in report.systems:
        checks = s.checks
        cells = [_fmt(checks.value(k) if checks is not None else None, 3) for k in keys]
        rows.append([s.name, *cells])
    lines += _table(["system", *(CHECKS[k].label for k in keys)], rows)
    lines += ["", f"Regressions against `{report.base_system}`:", ""]
    for s in report.systems:
        if s.regressions is None:
            continue
        found = "; ".join(r.describe() for r in s.regressions) or "none"
        lines.append(f"- {s.name}: {found}")
    return lines


def to_markdown(report: EvalReport) -> str:
    cfg = report.config
    conf = round(100 * cfg["confidence"])
    lines = [
        "# UPC evaluation",
        "",
        f"- date: {report.created_at}; users: {len(report.personas)}"
        + (f" ({report.source})" if report.source else "")
        + f"; seeds per user: {cfg['seeds']}; turns: {cfg['turns']}; seed: {cfg['seed']}",
        f"- simulated user: `{report.user_model_id}`",
        f"- training critic: `{report.train_critic_id}`; "
        f"evaluation critic: `{report.eval_critic_id}`",
        f"- perplexity under: `{report.perplexity_model_id or 'n/a'}`",
        f"- intervals: {conf}% percentile bootstrap over users ({cfg['n_boot']} resamples); "
        "* marks a difference whose interval excludes 0",
    ]
    lines += _critic_section(report, "eval", "Evaluation critic", conf)
    lines += _critic_section(report, "train", "Training critic", conf)
    agree = report.agreement or {}
    lines += [
        "",
        "Spearman ρ between the critics over all "
        f"{int(agree.get('pairs') or 0)} replies: "
        + ", ".join(f"{k} {_fmt(agree.get(k))}" for k in SCORE_KEYS),
    ]
    lines += _checks_section(report)
    lines += ["", "## Other critic-independent metrics", ""]
    rows = [
        [
            s.name,
            _fmt_ci(s.background_similarity),
            _fmt_pct(s.discovery_rate),
            _fmt_pct(s.discovery_rate_replies),
            _fmt_pct(s.passivity_rate),
            _fmt_pct(s.question_rate),
            _fmt_pct(s.repetition_rate),
        ]
        for s in report.systems
    ]
    header = [
        "system",
        "background sim.",
        "discovery",
        "discovery (replies only)",
        "passivity",
        "questions",
        "repetition",
    ]
    lines += _table(header, rows)
    turns = sorted({k for s in report.systems for k in s.eval.al.get("mean", {})})
    lines += ["", "## AL(k): mean(rel,int,val) at turn k, evaluation critic", ""]
    rows = [
        [s.name, *(_fmt(s.eval.al.get("mean", {}).get(k)) for k in turns)] for s in report.systems
    ]
    lines += _table(["system", *(f"k={k}" for k in turns)], rows)
    lines += [
        "",
        "Discovery: share of each user's occupation, education and hobbies that the bot's "
        "replies mention (lexical, or MiniLM cosine >= "
        f"{cfg['discovery_threshold']} with a reply sentence)"
        + (
            " or that the memory extractor captured from the user's messages"
            if cfg["use_memory"]
            else ""
        )
        + "; users without structured traits are left out. Traits revealed: background "
        f"sentences the user newly disclosed (MiniLM cosine >= {cfg['reveal_threshold']}) "
        "right after a bot question, per dialogue.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def _plot(report: EvalReport, path: Path) -> None:
    from matplotlib.figure import Figure

    keys = list(METRIC_LABELS)
    cols = 5
    bar_rows = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.4 * (bar_rows + 1.3)), layout="constrained")
    grid = fig.add_gridspec(bar_rows + 1, cols, height_ratios=[1.3] + [1] * bar_rows)
    ax = fig.add_subplot(grid[0, :])
    colors = [f"C{i}" for i in range(len(report.systems))]
    for system, color in zip(report.systems, colors, strict=True):
        for view, style in ((system.eval, "-"), (system.train, ":")):
            curve = view.al.get("mean", {})
            if not curve:
                continue
            ks = sorted(curve)
            fit = view.aloe.get("mean")
            ir = f", IR {fit.ir:+.3f}" if fit and fit.ir is not None else ""
            label = f"{system.name} ({'eval' if view is system.eval else 'train'}){ir}"
            ax.plot(ks, [curve[k] for k in ks], style, marker="o", color=color, label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("turn k")
    ax.set_ylabel("AL(k) = mean(rel,int,val)")
    ax.set_title("per-turn alignment level (solid: evaluation critic, dotted: training critic)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    names = [s.name for s in report.systems]
    for i, key in enumerate(keys):
        axis = fig.add_subplot(grid[1 + i // cols, i % cols])
        label, better, limits = METRIC_LABELS[key]
        means, low_err, high_err = [], [], []
        for system in report.systems:
            ci = system.metric(key)
            mean = ci.mean if ci is not None and ci.mean is not None else np.nan
            means.append(mean)
            has_ci = ci is not None and ci.low is not None and ci.high is not None
            low_err.append(mean - ci.low if has_ci else np.nan)  # type: ignore[union-attr,operator]
            high_err.append(ci.high - mean if has_ci else np.nan)  # type: ignore[union-attr,operator]
        axis.bar(range(len(names)), means, color=colors)
        axis.errorbar(
            range(len(names)), means, yerr=[low_err, high_err], fmt="none", ecolor="k", capsize=3
        )
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        axis.set_title(label + (f" ({better} is better)" if better else ""), fontsize=8)
        axis.tick_params(axis="y", labelsize=7)
        if limits is not None:
            axis.set_ylim(*limits)
    fig.savefig(path, dpi=110)


def write_outputs(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.png and transcripts.jsonl; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "png": out / "report.png",
        "transcripts": out / TRANSCRIPTS,
    }
    paths["json"].write_text(
        json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(to_markdown(report), encoding="utf-8")
    with paths["transcripts"].open("w", encoding="utf-8") as fh:
        for row in _transcript_rows(report):
            fh.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
    _plot(report, paths["png"])
    return paths
