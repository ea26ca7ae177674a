"""Command-line options of `cairn serve`."""

from __future__ import annotations

import argparse

from engine.bus.options import add_bus_options
from engine.config import DEFAULT_LISTEN, env_default, parse_listen


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(env_default("LISTEN", DEFAULT_LISTEN) or DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (env CAIRN_LISTEN; default {DEFAULT_LISTEN})",
    )
    add_bus_options(parser)
