"""`upc adapters list | show ID | import DIR | activate ID|base | rollback | retire ID`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.settings import Settings
from learner.registry import AdapterError, AdapterRegistry
from storage.db import Database

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("adapters", help="list, inspect, import and activate adapters")
    sub = parser.add_subparsers(dest="adapters_command", required=True)
    sub.add_parser("list", help="published adapters and their status")
    show = sub.add_parser("show", help="an adapter's manifest, after verifying its files")
    show.add_argument("id")
    imp = sub.add_parser("import", help="import an adapter directory trained elsewhere")
    imp.add_argument("dir")
    imp.add_argument("--id", default=None, help="id to publish it under")
    act = sub.add_parser("activate", help="serve an adapter ('base' for the plain model)")
    act.add_argument("id")
    act.add_argument("--reason", default=None)
    sub.add_parser("rollback", help="go back to the previously active adapter")
    retire = sub.add_parser("retire", help="mark an adapter as not to be served")
    retire.add_argument("id")
    retire.add_argument("--reason", default="retired by operator")
    parser.set_defaults(func=_handler)


def _registry(settings: Settings) -> AdapterRegistry:
    return AdapterRegistry(settings.adapters_dir, Database.from_settings(settings))


def _handler(args: argparse.Namespace, settings: Settings) -> int:
    registry = _registry(settings)
    try:
        return _COMMANDS[args.adapters_command](registry, args)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing was changed", file=sys.stderr)
        return 1


def _list(registry: AdapterRegistry, _args: argparse.Namespace) -> int:
    active = registry.active_id()
    manifests = registry.list()
    print(f"active: {active}")
    if not manifests:
        print("no adapters published")
        return 0
    header = ("", "id", "iter", "parent", "status", "created", "gate", "reason")
    rows = [header]
    for m in manifests:
        gate = m.metrics.get("gate", {}) if isinstance(m.metrics, dict) else {}
        delta = gate.get("delta")
        rows.append(
            (
                "*" if m.id == active else "",
                m.id,
                "-" if m.iteration is None else str(m.iteration),
                m.parent_id or "-",
                m.status,
                m.created_at,
                "-" if delta is None else f"{delta:+.3f}",
                (m.status_reason or "")[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _show(registry: AdapterRegistry, args: argparse.Namespace) -> int:
    manifest = registry.get(args.id)
    data = manifest.to_dict()
    try:
        registry.verify(args.id)
        data["verified"] = True
    except AdapterError as exc:
        data["verified"] = False
        data["verification_error"] = str(exc)
    data["active"] = registry.active_id() == args.id
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0 if data["verified"] else 1


def _import(registry: AdapterRegistry, args: argparse.Namespace) -> int:
    manifest = registry.import_dir(args.dir, adapter_id=args.id)
    print(f"imported {manifest.id} as a candidate ({len(manifest.files)} files verified)")
    return 0


def _activate(registry: AdapterRegistry, args: argparse.Namespace) -> int:
    previous = registry.active_id()
    active = registry.activate(args.id, reason=args.reason)
    print(f"active adapter: {previous} -> {active}")
    return 0


def _rollback(registry: AdapterRegistry, _args: argparse.Namespace) -> int:
    previous = registry.active_id()
    active = registry.rollback()
    print(f"rolled back: {previous} -> {active}")
    return 0


def _retire(registry: AdapterRegistry, args: argparse.Namespace) -> int:
    registry.retire(args.id, args.reason)
    print(f"retired {args.id}: {args.reason}")
    return 0


_COMMANDS = {
    "list": _list,
    "show": _show,
    "import": _import,
    "activate": _activate,
    "rollback": _rollback,
    "retire": _retire,
}
