"""`upc jobs list|status|history|pause|resume|reschedule|run|guard-eval`, `upc erase USER`.

The CLI writes the operator's wishes into `job_controls`; the active scheduler (in the app
or a `upc worker`, wired in `chatbot.cli` because it uses the memory service) applies them
within `scheduler_poll_seconds`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.settings import Settings
from learner.erasure import erase_user, find_user_id
from learner.guard import evaluate_sample, load_sample
from learner.registry import AdapterRegistry
from learner.scheduler import JobRecords
from storage.db import Database

__all__ = ["register"]

JOB_NAMES = ("curriculum", "critique", "retrain")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("jobs", help="the learning scheduler's jobs")
    sub = parser.add_subparsers(dest="jobs_command", required=True)
    sub.add_parser("list", help="jobs, their schedules and pause state")
    sub.add_parser("status", help="the scheduler lease and each job's live progress")
    history = sub.add_parser("history", help="recent runs: start, end, outcome, counts, error")
    history.add_argument("name", nargs="?", default=None)
    history.add_argument("--limit", type=int, default=20)
    for command in ("pause", "resume", "run"):
        p = sub.add_parser(command, help=f"{command} a job")
        p.add_argument("name")
    resched = sub.add_parser("reschedule", help="change a job's interval or cron schedule")
    resched.add_argument("name")
    group = resched.add_mutually_exclusive_group(required=True)
    group.add_argument("--minutes", type=float, help="interval in minutes (0 = off)")
    group.add_argument("--cron", help='crontab expression, e.g. "0 3 * * *"')
    sub.add_parser("guard-eval", help="precision/recall of the poisoning guard on its sample")
    parser.set_defaults(func=_jobs)

    erase = subparsers.add_parser(
        "erase", help="right to erasure: delete a user and everything learned from them"
    )
    erase.add_argument("user", help="user name or id")
    erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    erase.set_defaults(func=_erase)


def _fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    if args.jobs_command == "guard-eval":
        return _guard_eval()
    records = JobRecords(Database.from_settings(settings))
    command = args.jobs_command
    try:
        if command == "list":
            controls = records.controls()
            if not controls:
                print("no jobs yet: start `upc worker` (or the app) once")
            for name, c in sorted(controls.items()):
                when = (
                    c.cron
                    if c.kind == "cron"
                    else (f"every {c.seconds / 60:g} min" if c.kind == "interval" else "off")
                )
                state = "paused" if c.paused else "active"
                print(f"{name:12} {state:7} {when:20} ({c.source})")
        elif command == "status":
            lease = records.lease()
            if lease is None or not lease.live:
                print("scheduler: none active")
            else:
                print(f"scheduler: {lease.holder} (lease until {_fmt_time(lease.expires_at)} UTC)")
            for name, p in sorted(records.progress_rows().items()):
                state = "running" if p.running else "idle"
                bar = f"{p.done}/{p.total}" if p.total else ""
                print(f"{name:12} {state:8} {p.stage:14} {bar:9} {p.message}")
        elif command == "history":
            for run in records.runs(args.name, limit=args.limit):
                print(
                    f"#{run.id:<5} {run.job:11} {run.trigger:9} {run.status:11} "
                    f"{_fmt_time(run.started_at)} -> {_fmt_time(run.finished_at)} "
                    f"{json.dumps(run.counts)}"
                    + (f"\n        error: {run.error}" if run.error else "")
                )
        elif command in ("pause", "resume"):
            records.set_paused(args.name, command == "pause")
            print(f"{args.name}: {command}d (applied by the active scheduler)")
        elif command == "reschedule":
            if args.cron is not None:
                records.set_schedule(args.name, cron=args.cron)
            else:
                records.set_schedule(args.name, seconds=args.minutes * 60)
            print(f"{args.name}: rescheduled")
        elif command == "run":
            records.request_run(args.name)
            print(f"{args.name}: run requested (the active scheduler starts it shortly)")
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 0


def _guard_eval() -> int:
    metrics = evaluate_sample(load_sample())
    print(
        json.dumps(
            {
                "n": metrics.n,
                "precision": metrics.precision,
                "recall": metrics.recall,
                "false_positive_rate": metrics.false_positive_rate,
                "by_label": metrics.by_label,
                "misses": metrics.misses,
                "false_alarms": metrics.false_alarms,
            },
            indent=2,
        )
    )
    return 0


def _erase(args: argparse.Namespace, settings: Settings) -> int:
    db = Database.from_settings(settings)
    user_id = find_user_id(db, args.user)
    if user_id is None:
        print(f"error: no user {args.user!r}; nothing was changed", file=sys.stderr)
        return 2
    if not args.yes:
        answer = input(f"erase user {args.user!r} and everything learned from them? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("cancelled; nothing was changed")
            return 1
    report = erase_user(
        db,
        user_id,
        data_dir=settings.data_dir,
        runs_dir=settings.runs_dir,
        registry=AdapterRegistry(settings.adapters_dir, db),
        chroma_dir=settings.chroma_dir,
        chroma_url=settings.memory.chroma_url,
        exports_dir=settings.exports_dir,
        downloads_dir=settings.console_downloads_dir,
    )
    print(json.dumps(report.to_dict(), indent=2))
    if report.chroma_server_error:
        print(
            f"error: {report.chroma_server_error}; the user's vectors stay there until "
            "`upc memory rebuild` runs against it (everything else is erased)",
            file=sys.stderr,
        )
        return 1
    return 0
