"""Device machine, last step of the recorded ISCO-800 run (docs/results.md).

Once the three iterations are complete, evaluates base and every trained adapter on all
200 test users (2 seeds, T=5) under the training critic and the evaluation critic, then
copies the report, the transcripts and the final adapter (split under 16 MiB) to $OUT.
Prints JSON lines. Usage: python bench/gpu/isco800_eval.py --budget SECONDS
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from core.settings import load_settings
from learner.iterate import load_iteration_state
from learner.registry import AdapterRegistry
from storage.db import Database

PART = 15 * 2**20


def _copy_adapter(registry: AdapterRegistry, adapter_id: str, out: Path) -> None:
    """The adapter directory as a tar, split into parts that $OUT accepts."""
    tar_path = Path("/tmp") / f"{adapter_id}.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(registry.path(adapter_id), arcname=adapter_id)
    data = tar_path.read_bytes()
    for k in range(0, len(data), PART):
        (out / f"adapter.tar.part{k // PART}").write_bytes(data[k : k + PART])
    print(json.dumps({"adapter": adapter_id, "bytes": len(data)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=540)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()
    settings = load_settings()
    states = [load_iteration_state(settings.runs_dir, k) for k in range(1, args.iterations + 1)]
    if not all(s.complete for s in states):
        print(json.dumps({"eval": "waiting", "done": [s.done for s in states]}), flush=True)
        return 0
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(settings.adapters_dir, Database.from_settings(settings))
    trained = [s.adapter_id for s in states if s.adapter_id]
    eval_dir = settings.runs_dir / "eval-test"
    if not (eval_dir / "report.json").is_file() and args.budget > 60:
        systems = ",".join(["base", *trained])
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "chatbot.cli", "eval", "--split", "test"]
        cmd += ["--users", str(args.users), "--seeds", "2", "--turns", "5"]
        cmd += ["--systems", systems, "--out", str(eval_dir), "--seed", "7"]
        cmd += ["--no-progress", "--no-memory"]
        subprocess.run(cmd, timeout=max(60, args.budget - 30), check=False)
        print(json.dumps({"eval_s": round(time.perf_counter() - started, 1)}), flush=True)
    if (eval_dir / "report.json").is_file():
        # One archive: $OUT takes at most 8 files.
        with tarfile.open(out / "eval.tgz", "w:gz") as tar:
            tar.add(eval_dir, arcname="eval-test")
    active = registry.active_id()
    final = active if active != "base" else (trained[-1] if trained else None)
    if final is not None:
        _copy_adapter(registry, final, out)
    print(json.dumps({"active": active, "trained": trained}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
