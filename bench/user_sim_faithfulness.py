"""Does the simulated user stay in character? Role breaks, placeholders and faithfulness.

Runs Algorithm-1 dialogues (no regenerations) with the embedded SmolLM2-135M as both chatbot
and simulated user and the MiniLM embedding critic, on N train personas spread over the
occupation groups, then checks every user turn (the introduction and each answer):

- role_break_rate / placeholder_rate: share of user turns flagged by
  ``learner.simulated_user.check_user_turn``.
- grounded_rate: share of user turns with some sentence whose MiniLM cosine to some sentence
  of the persona's background is >= --threshold (0.45 by default: on Synthetic-Persona-Chat,
  docs/simulated_user.md, a speaker's lines clear it against their own persona facts far
  more often than against another speaker's).
- consistent_rate: share of user turns that contradict nothing detectable: no other name
  given as their own, no stated age absent from the background, no "I work as ..." clause
  that matches no background sentence (cosine < 0.35).

Prints JSON. Heavy on the CPU: run it under ``nice``.

    nice .venv/bin/python bench/user_sim_faithfulness.py --users 12 --turns 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from learner.simulated_user import background_facts, check_user_turn, role_break_kinds

log = logging.getLogger("user_sim_faithfulness")
GROUNDED_COS = 0.45
JOB_COS = 0.35
_SENT = re.compile(r"(?<=[.!?…])\s+|\n+")
_NAME = re.compile(r"\b(?i:my name is|call me|i am|i'm|this is)\s+([A-Z][a-z]{2,})\b")
_AGE = re.compile(
    r"\b(?:i am|i'm|i turned|i just turned)\s+(\d{1,3})\b(?!\s*(?:%|percent|minutes|hours))"
)
_JOB = re.compile(
    r"\b(?:i work as|i'm working as|i am working as|i'm employed as|i am employed as|"
    r"my job is|i work at|i work in)\s+([^.,;!?\n]{3,60})",
    re.IGNORECASE,
)


@dataclass
class TurnCheck:
    persona_id: str
    turn: int
    text: str
    role_break: list[str] = field(default_factory=list)
    placeholder: bool = False
    grounded: float = 0.0
    contradictions: list[str] = field(default_factory=list)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if len(s.strip().split()) >= 2] or [text]


def _contradictions(text: str, name: str, background: str, job_cos: float) -> list[str]:
    out = []
    own = set(name.split()) | set(re.findall(r"[A-Z][a-z]+", background))
    for m in _NAME.finditer(text):
        if m.group(1) not in own:
            out.append(f"name:{m.group(1)}")
    ages = set(re.findall(r"\b(\d{1,3})\b", background))
    for m in _AGE.finditer(text.lower()):
        if 15 <= int(m.group(1)) <= 99 and m.group(1) not in ages:
            out.append(f"age:{m.group(1)}")
    if job_cos < JOB_COS:
        out.append("job")
    return out


def check_turns(dialogues, personas, embedder, threshold: float) -> list[TurnCheck]:
    by_id = {p.id: p for p in personas}
    checks: list[TurnCheck] = []
    for d in dialogues:
        persona = by_id[d.persona_id]
        texts = [d.user_intro, *(t.user_answer for t in d.turns)]
        facts = background_facts(persona.background) or [persona.background]
        fact_vecs = embedder.encode(facts)
        for index, text in enumerate(t for t in texts if t):
            sents = _sentences(text)
            grounded = float(np.max(embedder.encode(sents) @ fact_vecs.T))
            jobs = [m.group(0) for m in _JOB.finditer(text)]
            job_cos = float(np.max(embedder.encode(jobs) @ fact_vecs.T)) if jobs else 1.0
            flags = check_user_turn(text, user_name=persona.name)
            checks.append(
                TurnCheck(
                    persona_id=persona.id,
                    turn=index + 1,
                    text=text,
                    role_break=list(role_break_kinds(text, user_name=persona.name)),
                    placeholder=flags.placeholder,
                    grounded=round(grounded, 3),
                    contradictions=_contradictions(text, persona.name, persona.background, job_cos),
                )
            )
    return checks


def summarise(checks: list[TurnCheck], threshold: float) -> dict:
    n = len(checks) or 1
    kinds: dict[str, int] = {}
    for c in checks:
        for k in c.role_break:
            kinds[k] = kinds.get(k, 0) + 1
    bad = [c for c in checks if c.role_break or c.placeholder]
    return {
        "user_turns": len(checks),
        "role_break_rate": round(sum(bool(c.role_break) for c in checks) / n, 4),
        "placeholder_rate": round(sum(c.placeholder for c in checks) / n, 4),
        "role_break_kinds": kinds,
        "grounded_threshold": threshold,
        "grounded_rate": round(sum(c.grounded >= threshold for c in checks) / n, 4),
        "mean_best_cos": round(float(np.mean([c.grounded for c in checks])) if checks else 0, 4),
        "consistent_rate": round(sum(not c.contradictions for c in checks) / n, 4),
        "first_person_rate": round(
            sum(bool(re.search(r"\b(?:I|I'm|my|me)\b", c.text)) for c in checks) / n, 4
        ),
        "mean_words": round(float(np.mean([len(c.text.split()) for c in checks])), 1)
        if checks
        else 0.0,
        "flagged_examples": [asdict(c) for c in bad[:6]],
        "contradiction_examples": [asdict(c) for c in checks if c.contradictions][:4],
    }


def _personas(n: int, offset: int) -> list:
    from personas.catalog import load_shipped

    train = [p for p in load_shipped() if p.split == "train"]
    stride = max(1, len(train) // max(1, n))  # one per occupation group, not 12 of one
    picked = train[offset::stride][:n]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} train personas available")
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--offset", type=int, default=0, help="first train persona")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=GROUNDED_COS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=4, help="users generated together")
    parser.add_argument("--dump", default=None, help="write every checked turn here (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from core.embeddings import Embedder
    from core.local_model import LocalModel
    from core.runtime import ensure_embedded_model
    from core.settings import load_settings
    from learner.critic import EmbeddingCritic
    from learner.generate import run_dialogues
    from learner.simulated_user import user_prompt_version

    model_dir = ensure_embedded_model(load_settings().models_dir)
    model = LocalModel(
        str(model_dir),
        model_id="embedded:SmolLM2-135M-Instruct",
        device=args.device,
        max_batch_size=max(8, args.users),
        batch_window_ms=0,
    )
    embedder = Embedder(device=args.device)
    personas = _personas(args.users, args.offset)
    critic = EmbeddingCritic(embedder)
    started = time.perf_counter()
    dialogues: list = []
    checks: list[TurnCheck] = []
    chunk = max(1, args.chunk)
    try:
        # Chunks, each reported as it ends: a run cut short on a busy CPU still says something.
        for start in range(0, len(personas), chunk):
            part = personas[start : start + chunk]
            done = run_dialogues(
                model, model, critic, part, turns=args.turns, seed=args.seed, batch_size=chunk
            )
            dialogues.extend(done)
            checks.extend(check_turns(done, part, embedder, args.threshold))
            partial = summarise(checks, args.threshold)
            partial.pop("flagged_examples")
            partial.pop("contradiction_examples")
            elapsed = round(time.perf_counter() - started, 1)
            log.warning("after %d users (%.0f s): %s", len(dialogues), elapsed, json.dumps(partial))
            if args.dump:
                Path(args.dump).write_text(json.dumps([asdict(c) for c in checks], indent=1))
    finally:
        model.close()
    elapsed = time.perf_counter() - started
    out = {
        "benchmark": "user_sim_faithfulness",
        "users": args.users,
        "turns": args.turns,
        "seed": args.seed,
        "user_prompt_version": user_prompt_version(),
        "dialogues_failed": sum(d.status == "failed" for d in dialogues),
        "failure_causes": sorted({d.cause for d in dialogues if d.status == "failed"}),
        "elapsed_s": round(elapsed, 1),
        **summarise(checks, args.threshold),
    }
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
