"""Command-line options of `cairn serve`."""

from __future__ import annotations

import argparse

from engine.bus.options import add_bus_options
from engine.config import DEFAULT_LISTEN, env_default, parse_listen

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_UPLOAD_EXPIRY_HOURS = 24.0


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(env_default("LISTEN", DEFAULT_LISTEN) or DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (env CAIRN_LISTEN; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--relative-urls",
        action="store_true",
        default=env_default("RELATIVE_URLS", "") in ("1", "true", "yes"),
        help="send Location headers as paths instead of absolute URLs built "
        "from the Host and X-Forwarded-* headers (env CAIRN_RELATIVE_URLS=1)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=float(
            env_default("SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT))
            or DEFAULT_SHUTDOWN_TIMEOUT
        ),
        help="seconds to let in-flight requests finish after SIGTERM or SIGINT "
        "before they are cancelled (env CAIRN_SHUTDOWN_TIMEOUT; "
        f"default {DEFAULT_SHUTDOWN_TIMEOUT:g})",
    )
    parser.add_argument(
        "--upload-expiry",
        type=float,
        default=float(
            env_default("UPLOAD_EXPIRY", str(DEFAULT_UPLOAD_EXPIRY_HOURS))
            or DEFAULT_UPLOAD_EXPIRY_HOURS
        ),
        help="hours an upload may sit idle before its session and staging file "
        "are deleted; checked hourly (env CAIRN_UPLOAD_EXPIRY; "
        f"default {DEFAULT_UPLOAD_EXPIRY_HOURS:g})",
    )
    add_bus_options(parser)
