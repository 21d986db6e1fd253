"""The console's matplotlib figures: validation scores, regeneration, score histograms, loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatbot.console.records import DIMS, IterationRow, LossPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_histograms", "plot_loss", "plot_regeneration", "plot_validation"]


def _figure(width: float = 6.0, height: float = 3.4) -> Figure:
    # matplotlib loads only when an operator draws a plot, not at app start.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_validation(rows: list[IterationRow]) -> Figure:
    """Validation rel/int/val per iteration as lines, the easy-sample rate as bars."""
    fig = _figure()
    ax = fig.add_subplot()
    ks = [r.iteration for r in rows]
    easy = [r.easy_rate or 0.0 for r in rows]
    bars = ax.twinx()
    bars.bar(ks, easy, color="#cfd8dc", width=0.5, label="easy rate")
    bars.set_ylim(0, 1)
    bars.set_ylabel("easy-sample rate")
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    for d, color in zip(DIMS, ("#1f77b4", "#d62728", "#2ca02c"), strict=True):
        pts = [(r.iteration, r.means.get(d)) for r in rows if r.means.get(d) is not None]
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


def plot_regeneration(rows: list[IterationRow]) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    pts = [(r.iteration, r.regeneration_rate) for r in rows if r.regeneration_rate is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#9467bd")
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("regeneration rate")
    ax.set_title("Regeneration rate per iteration" if pts else "No iterations yet")
    fig.tight_layout()
    return fig


def plot_histograms(values: dict[str, list[float]]) -> Figure:
    fig = _figure(7.5, 3.0)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, d in zip(axes, DIMS, strict=True):
        ax.hist(values.get(d) or [], bins=[0.5, 1.5, 2.5, 3.5, 4.5, 5.5], color="#1f77b4")
        ax.set_title(f"{d} (n={len(values.get(d) or [])})")
        ax.set_xticks([1, 2, 3, 4, 5])
    axes[0].set_ylabel("replies")
    fig.tight_layout()
    return fig


def plot_loss(history: list[LossPoint], adapter_id: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    for stage in sorted({h.stage for h in history}):
        pts = [(h.step, h.loss) for h in history if h.stage == stage]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=stage)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss of {adapter_id}" if history else "No loss record for this adapter")
    if history:
        ax.legend()
    fig.tight_layout()
    return fig
