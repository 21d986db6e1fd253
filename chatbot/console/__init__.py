"""The operator console: adapters, compare, A/B split, learner jobs, plots, dialogues, export.

`build_console()` adds its components to the current Blocks context (the hidden "Operator
console" tab). Every handler checks on the server that the caller is an admin; hiding the
tab is only cosmetic. The data work lives in `ConsoleData` and `LearnerData`, so it is
usable (and testable) without the UI.

- `records`: the typed rows the tables and plots show.
- `data`: adapters, comparisons, the A/B split and the chat logs (`ConsoleData`).
- `learner_data`: the learner's jobs, schedules and plotted series (`LearnerData`).
- `plots`: the matplotlib figures.
- `context`: the admin check and what every tab builder is handed.
- `adapters_tab`, `learner_tab`, `plots_tab`, `dialogues_tab`, `export_tab`: one per tab.
- `build`: `build_console`, which puts the tabs together.
"""

from __future__ import annotations

from chatbot.console.build import build_console
from chatbot.console.context import require_admin
from chatbot.console.data import ConsoleData
from chatbot.console.export_tab import export_filters, export_for_download
from chatbot.console.learner_data import LearnerData
from chatbot.console.plots import plot_histograms, plot_loss, plot_regeneration, plot_validation
from chatbot.console.records import AdapterRow, ArmStats, TurnView

__all__ = [
    "AdapterRow",
    "ArmStats",
    "ConsoleData",
    "LearnerData",
    "TurnView",
    "build_console",
    "export_filters",
    "export_for_download",
    "plot_histograms",
    "plot_loss",
    "plot_regeneration",
    "plot_validation",
    "require_admin",
]
