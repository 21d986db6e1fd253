"""The `upc` command. Each area registers its own sub-command group."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from chatbot import memory_cli
from chatbot.accounts import AccountError, Accounts
from chatbot.server import launch
from chatbot.services import build_services, build_worker_memory
from core.runtime import ensure_embedded_model
from core.settings import Settings, masked_dict
from learner.commands import register_learning, run
from learner.worker import run_worker, start_embedded_scheduler
from personas import cli as personas_cli
from storage import Database

__all__ = ["main"]


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.host:
        settings.server.host = args.host
    if args.port:
        settings.server.port = args.port
    services = build_services(settings)
    scheduler = None
    try:
        if settings.learner.schedule.scheduler_enabled:
            # Only one scheduler is active across processes (a lease in the database);
            # a second app or `upc worker` stands by.
            scheduler = start_embedded_scheduler(
                settings,
                db=services.db,
                models=services.models,
                chatbot=services.chatbot_model,
                memory=services.memory,
            )
        launch(settings, services)
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        services.close()
    return 0


def _worker(_args: argparse.Namespace, settings: Settings) -> int:
    db = Database.from_settings(settings)
    return run_worker(settings, db=db, memory=build_worker_memory(settings, db))


def _materialize(_args: argparse.Namespace, settings: Settings) -> int:
    path = ensure_embedded_model(settings.models_dir)
    print(f"embedded model ready at {path}")
    return 0


def _settings(_args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(masked_dict(settings), indent=2))
    return 0


def _users_add(args: argparse.Namespace, settings: Settings) -> int:
    password = args.password or getpass.getpass(f"password for {args.name}: ")
    accounts = Accounts(Database.from_settings(settings), admin_names=settings.admin_user_names)
    try:
        user = accounts.create(args.name, password, is_admin=args.admin)
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created user {user.username} (admin={user.is_admin})")
    return 0


def _users_passwd(args: argparse.Namespace, settings: Settings) -> int:
    password = args.password or getpass.getpass(f"new password for {args.name}: ")
    accounts = Accounts(Database.from_settings(settings), admin_names=settings.admin_user_names)
    try:
        accounts.change_password(args.name, password)
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"password of {args.name} changed; its open sessions are signed out")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upc", description="UPC Chat: a chatbot that keeps learning."
    )
    parser.add_argument("--config", help="TOML settings file (default: $UPC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the web app (and the /v1 API)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    sub.add_parser("worker", help="run the learning scheduler until SIGTERM").set_defaults(
        func=_worker
    )
    sub.add_parser("materialize", help="convert the embedded model once").set_defaults(
        func=_materialize
    )
    sub.add_parser("settings", help="print the effective settings").set_defaults(func=_settings)

    users = sub.add_parser("users", help="manage accounts").add_subparsers(
        dest="users_command", required=True
    )
    add = users.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--password", help="(default: prompt)")
    add.add_argument("--admin", action="store_true")
    add.set_defaults(func=_users_add)
    passwd = users.add_parser("passwd", help="change a password (ends the user's sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--password", help="(default: prompt)")
    passwd.set_defaults(func=_users_passwd)

    personas_cli.register(sub)
    register_learning(sub)
    memory_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(_build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
