"""`python -m learner`: the learning commands without the web app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_learning_commands_run_without_the_web_app(tmp_path: Path) -> None:
    env = {**os.environ, "UPC_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    probe = "import sys, learner.__main__; print(sorted({'gradio', 'chatbot'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-500:]
    run = subprocess.run(
        [sys.executable, "-m", "learner", "learn", "select", "--iteration", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # A real command on a real (empty) data dir: a clear refusal, not a crash.
    assert run.returncode == 2, run.stderr[-500:]
    assert "no generation run" in run.stderr + run.stdout
