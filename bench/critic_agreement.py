"""How far the training critic (rubric) and the evaluation critic (spc) agree, on the
attempts of a recorded corpus (a JSONL(.gz) of DialogueRecords with attempts). Prints JSON.

Usage: python bench/critic_agreement.py --corpus docs/results/isco800-2026-11-30/iter-001-corpus.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from dataclasses import asdict
from pathlib import Path

from core.embeddings import Embedder
from core.settings import load_settings
from learner.critic import build_critic
from learner.eval_critic import critic_agreement
from learner.records import CriticInput, Score
from personas.catalog import PersonaCatalog


def _read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--dialogues", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rescore", action="store_true", help="rescore with today's rubric")
    args = parser.parse_args()
    settings = load_settings()
    catalog = PersonaCatalog.load(settings)
    done = [d for d in _read(args.corpus) if d["status"] == "done"]
    rng = random.Random(args.seed)
    items, stored, groups = [], [], []
    for d in rng.sample(done, min(args.dialogues, len(done))):
        persona = catalog.get(d["persona_id"])
        history = [("assistant", d["greeting"]), ("user", d["user_intro"])]
        for turn in d["turns"]:
            for attempt in turn["attempts"]:
                score = Score.from_dict(attempt["score"])
                if score.scored:
                    items.append(
                        CriticInput(
                            persona.name, persona.background, tuple(history), attempt["reply"]
                        )
                    )
                    stored.append(score)
                    groups.append(f"{d['id']}-{turn['index']}")
            history += [("assistant", turn["final_reply"]), ("user", turn["user_answer"])]
    embedder = Embedder()
    train = (
        build_critic(settings, kind="rubric", embedder=embedder).score_batch(items)
        if args.rescore
        else stored
    )
    spc = build_critic(settings, kind="spc", embedder=embedder).score_batch(items)
    report = critic_agreement(train, spc, groups=groups)
    means = {
        "rubric": sum(s.mean() for s in train) / len(train),
        "spc": sum(s.mean() for s in spc) / len(spc),
    }
    print(
        json.dumps(
            {
                "corpus": str(args.corpus),
                "items": len(items),
                "means": means,
                "agreement": asdict(report),
            },
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
