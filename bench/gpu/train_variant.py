"""Device machine: train another adapter on an iteration's recorded selection, with some
training settings changed (for example DPO on), and publish it beside the first.

The corpus is generated once; each variant is the same data under another training recipe,
so the test evaluation compares recipes, not samples. Prints one JSON line per variant.
Usage: python bench/gpu/train_variant.py --iteration 1 --set dpo=true --set epochs=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from core.prompting import load_prompt
from core.settings import load_settings
from core.types import BASE_ADAPTER
from learner import stages
from learner.iterate import load_iteration_state
from learner.registry import AdapterRegistry
from learner.train import TrainConfig
from storage.db import Database


def _value(current: Any, text: str) -> Any:
    """``text`` as the type of the setting it replaces."""
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes", "on")
    return type(current)(text)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iteration", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = load_settings()
    train = settings.learner.train
    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        overrides[key] = _value(getattr(train, key), text)
    config = TrainConfig.from_settings(dataclasses.replace(train, **overrides))
    state = load_iteration_state(settings.runs_dir, args.iteration)
    if state.selection is None:
        raise SystemExit(f"iteration {args.iteration} has no selection yet")
    registry = AdapterRegistry(settings.adapters_dir, Database.from_settings(settings))
    outcome = stages.train(
        registry,
        state.selection,
        runs_dir=settings.runs_dir,
        base=stages.BaseModel.from_settings(settings),
        config=config,
        parent_id=BASE_ADAPTER,
        cumulative=False,
        system_prompt=str(load_prompt("upc_system")),
    )
    line = {"variant": overrides, "adapter_id": outcome.adapter_id, "metrics": outcome.metrics}
    print(json.dumps(line, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
