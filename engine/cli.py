"""The `cairn` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.config import StorageSettings, add_storage_options
from engine.logs import configure_logging


def _open_registry(args: argparse.Namespace, *, migrate: bool = True):  # type: ignore[no-untyped-def]
    from engine.migrate import upgrade
    from engine.registry import Registry

    settings = StorageSettings.from_args(args)
    registry = Registry.open(settings.data_dir, settings.database_url)
    if migrate:
        upgrade(registry.database)
    return registry


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    _open_registry(args)
    print("schema is up to date")
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from engine.projections.rebuild import rebuild_projections

    registry = _open_registry(args)
    position = rebuild_projections(registry.database)
    print(f"projections rebuilt up to position {position}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from engine.verify import verify

    registry = _open_registry(args)
    problems = verify(registry)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print("log, blobs and projections verified: no problems found")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from engine.api.server import serve

    return serve(args)


def _cmd_events_tail(args: argparse.Namespace) -> int:
    from engine.bus.tail import tail

    return tail(args)


def _cmd_webhook(args: argparse.Namespace) -> int:
    from consumers.webhook.commands import main as webhook_main

    return webhook_main(args)


def _cmd_mirror(args: argparse.Namespace) -> int:
    from consumers.mirror.commands import main as mirror_main

    return mirror_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cairn", description="A container registry whose storage is an event log."
    )
    parser.add_argument(
        "--log-level", default="info", help="debug, info, warning or error"
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="log line format; auto means JSON unless standard error is a terminal",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the registry HTTP server")
    add_storage_options(serve)
    from engine.api.options import add_serve_options

    add_serve_options(serve)
    serve.set_defaults(handler=_cmd_serve)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_upgrade = db_commands.add_parser("upgrade", help="run the schema migrations")
    add_storage_options(db_upgrade)
    db_upgrade.set_defaults(handler=_cmd_db_upgrade)

    projections = commands.add_parser("projections", help="projections of the log")
    projection_commands = projections.add_subparsers(
        dest="projection_command", required=True, metavar="COMMAND"
    )
    rebuild = projection_commands.add_parser(
        "rebuild", help="drop every projection and replay the log"
    )
    add_storage_options(rebuild)
    rebuild.set_defaults(handler=_cmd_rebuild)

    verify = commands.add_parser(
        "verify", help="check the hash chain, blob contents and projections"
    )
    add_storage_options(verify)
    verify.set_defaults(handler=_cmd_verify)

    events = commands.add_parser("events", help="the event stream")
    event_commands = events.add_subparsers(
        dest="events_command", required=True, metavar="COMMAND"
    )
    tail = event_commands.add_parser("tail", help="print events as they arrive on NATS")
    from engine.bus.options import add_tail_options

    add_tail_options(tail)
    tail.set_defaults(handler=_cmd_events_tail)

    webhook = commands.add_parser(
        "webhook", help="deliver events from NATS to HTTP endpoints"
    )
    from consumers.webhook.options import add_webhook_options

    add_webhook_options(webhook)
    webhook.set_defaults(handler=_cmd_webhook)

    mirror = commands.add_parser(
        "mirror", help="replay a cairn's history into another registry, then follow it"
    )
    from consumers.mirror.options import add_mirror_options

    add_mirror_options(mirror)
    mirror.set_defaults(handler=_cmd_mirror)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json_logs)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
