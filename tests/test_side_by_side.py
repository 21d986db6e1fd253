"""The blind side-by-side page: pairing, hidden key, escaping, unblinding, and the CLI."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from chatbot.cli import main
from learner.eval_report import TRANSCRIPTS, TranscriptRow, read_transcripts
from learner.records import DialogueRecord, Score, TurnRecord
from learner.side_by_side import build_items, render_html, unblind, write_side_by_side

EVIL = "<script>alert('pwned')</script>"


def _row(system: str, user: int, seed: int, reply: str) -> TranscriptRow:
    score = Score(rel=4, int=3, val=3)
    turn = TurnRecord(2, "I fix ferries.", reply, score, reply, score, user_answer="Mostly.")
    record = DialogueRecord(
        id=f"{system}-{user}-{seed}",
        persona_id=f"t:{user}",
        persona_name=f"Person {user}",
        status="done",
        greeting=f"Hello! ({len(system)})",
        user_intro="Hi, I fix ferries.",
        turns=[turn],
    )
    return TranscriptRow(
        system=system,
        persona_id=f"t:{user}",
        persona_name=f"Person {user}",
        background=f"Person {user} repairs ferries & loves <b>jazz</b>.",
        seed=seed,
        train_critic_id="rubric",
        eval_critic_id="spc",
        dialogue=asdict(record),
        eval_scores=[score.to_dict()],
    )


def _write(path: Path, rows: list[TranscriptRow]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def report_dirs(tmp_path: Path) -> tuple[Path, Path]:
    base = [_row("base", u, s, f"Base reply {u}-{s}.") for u in range(6) for s in range(2)]
    cand = [_row("it-002", u, s, f"Candidate reply {u}-{s}.") for u in range(6) for s in range(2)]
    cand[0] = _row("it-002", 0, 0, EVIL)
    cand.append(_row("it-002", 99, 0, "A user base never met."))
    return _write(tmp_path / "a" / TRANSCRIPTS, base).parent, _write(tmp_path / "b.jsonl", cand)


def test_items_pair_by_user_and_seed_and_shuffle_sides(report_dirs) -> None:
    a_dir, b_file = report_dirs
    rows_a, rows_b = read_transcripts(a_dir), read_transcripts(b_file)
    items = build_items(rows_a, "base", rows_b, "it-002", n=None, seed=1)
    assert len(items) == 12  # user 99 has no partner
    for item in items:
        assert {item.a.system, item.b.system} == {"base", "it-002"}
        assert item.a.persona_id == item.b.persona_id == item.persona_id
        assert item.a.seed == item.b.seed == item.seed
    sides = [item.a.system for item in items]
    assert 2 <= sides.count("base") <= 10  # both orders occur
    again = build_items(rows_a, "base", rows_b, "it-002", n=None, seed=1)
    assert [i.a.system for i in again] == sides
    assert len(build_items(rows_a, "base", rows_b, "it-002", n=5, seed=1)) == 5
    with pytest.raises(ValueError, match="share no"):
        build_items(rows_a, "base", rows_a, "nope", n=None)


def test_page_is_blind_escaped_and_self_contained(report_dirs, tmp_path: Path) -> None:
    a_dir, b_file = report_dirs
    page, key_file, count = write_side_by_side(a_dir, b_file, tmp_path / "out" / "sbs.html",
                                               n=None, seed=3)  # fmt: skip
    assert count == 12 and key_file.name == "sbs.key.json"
    text = page.read_text(encoding="utf-8")
    assert EVIL not in text and "&lt;script&gt;alert(" in text
    assert "<b>jazz</b>" not in text and "&lt;b&gt;jazz&lt;/b&gt;" in text
    assert "it-002" not in text and "Base reply" in text  # replies shown, names hidden
    assert text.count("<script>") == 1  # only the page's own tally script
    assert not re.search(r"""(?:src|href)=["']?https?:""", text)
    assert text.count('type="radio"') == 3 * 12
    key = json.loads(key_file.read_text())
    assert set(key["items"]) == set(re.findall(r'id="(item-\d{3})"', text))
    assert key["systems"] == ["base", "it-002"]
    hidden = render_html(build_items(read_transcripts(a_dir), "base", read_transcripts(b_file),
                                     "it-002", n=2), page_id="p", show_persona=False)  # fmt: skip
    assert "repairs ferries" not in hidden and "background hidden" in hidden

    # A judge prefers the candidate whenever it is on side A.
    answers = {"page": key["page"], "answers": {}}
    for item_id, sides in key["items"].items():
        answers["answers"][item_id] = "A" if sides["A"] == "it-002" else "tie"
    tally = unblind(key, answers)
    on_a = sum(1 for s in key["items"].values() if s["A"] == "it-002")
    assert tally.wins == {"base": 0, "it-002": on_a} and tally.ties == 12 - on_a
    assert tally.answered == 12
    with pytest.raises(ValueError):
        unblind(key, {"answers": {"item-999": "A"}})
    with pytest.raises(ValueError):
        unblind(key, {"page": "other", "answers": {}})


def test_cli_side_by_side_and_unblind(report_dirs, tmp_path: Path, capsys) -> None:
    a_dir, b_file = report_dirs
    out = tmp_path / "page.html"
    argv = ["eval", "side-by-side", "--a", str(a_dir), "--b", str(b_file), "--out", str(out)]
    assert main([*argv, "--n", "4", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 items" in printed and "page.key.json" in printed
    key = json.loads((tmp_path / "page.key.json").read_text())
    answers = tmp_path / "answers.json"
    choice = {i: "B" for i in key["items"]}
    answers.write_text(json.dumps({"page": "page", "answers": choice}), encoding="utf-8")
    assert main(["eval", "unblind", "--key", str(tmp_path / "page.key.json"), str(answers)]) == 0
    assert "answered 4 of 4" in capsys.readouterr().out
    # One file holding two systems needs the names; a missing one is named in the error.
    both = _write(tmp_path / "both.jsonl", read_transcripts(a_dir) + read_transcripts(b_file))
    assert main(["eval", "side-by-side", "--a", str(both), "--out", str(out)]) == 2
    assert "name one" in capsys.readouterr().err
    ok = ["eval", "side-by-side", "--a", str(both), "--a-system", "base", "--b-system",
          "it-002", "--out", str(out)]  # fmt: skip
    assert main(ok) == 0
    assert main([*ok[:-2], "--b-system", "x", "--out", str(out)]) == 2
