"""`upc memory ...`: rebuild the Chroma index from SQLite, list a user's facts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from chatbot.memory import MemoryService
from core.embeddings import Embedder
from core.settings import Settings
from storage import Database
from storage.models import User

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("memory", help="per-user background memory")
    commands = parser.add_subparsers(dest="memory_command", required=True)
    rebuild = commands.add_parser(
        "rebuild", help="recreate the Chroma memory index from the facts in SQLite"
    )
    rebuild.set_defaults(func=_rebuild)
    listing = commands.add_parser("list", help="list the facts remembered about one user")
    listing.add_argument("--user", required=True, help="user name")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(func=_list)
    return parser


def _service(settings: Settings) -> MemoryService:
    return MemoryService.from_settings(settings, Database.from_settings(settings), Embedder())


def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    service = _service(settings)
    start = time.perf_counter()
    try:
        count = service.rebuild()
    except Exception as exc:  # a CLI reports any failure as a message and an exit code
        print(f"memory rebuild failed: {exc}", file=sys.stderr)
        return 1
    finally:
        service.close()
    where = settings.memory.chroma_url or settings.chroma_dir
    print(
        f"rebuilt the memory index at {where}: {count} facts in {time.perf_counter() - start:.1f}s"
    )
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    service = _service(settings)
    try:
        with service.db.session() as session:
            user_id = session.execute(
                select(User.id).where(User.username == args.user)
            ).scalar_one_or_none()
        if user_id is None:
            print(f"no user named {args.user!r}", file=sys.stderr)
            return 1
        facts = service.list_facts(user_id)
        enabled = service.is_enabled(user_id)
    finally:
        service.close()
    if args.json:
        for fact in facts:
            print(
                json.dumps(
                    {
                        "id": fact.id,
                        "category": fact.category,
                        "key": fact.key,
                        "text": fact.text,
                        "source_conversation_id": fact.source_conversation_id,
                        "source_message_id": fact.source_message_id,
                        "created_at": fact.created_at.isoformat(),
                        "updated_at": fact.updated_at.isoformat(),
                    },
                    ensure_ascii=False,
                )
            )
        return 0
    print(f"{args.user}: {len(facts)} facts, memory {'on' if enabled else 'off'}")
    for fact in facts:
        print(f"  {fact.updated_at:%Y-%m-%d %H:%M}  [{fact.category}/{fact.key}]  {fact.text}")
    return 0
