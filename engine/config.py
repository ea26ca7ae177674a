"""Settings shared by every `cairn` command, from options or CAIRN_* variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = "./cairn-data"
DEFAULT_LISTEN = "127.0.0.1:5000"


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CAIRN_{name}", default)


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Add --data-dir and --database, the options every storage command takes."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env_default("DATA_DIR", DEFAULT_DATA_DIR) or DEFAULT_DATA_DIR),
        help="directory for blobs and the SQLite database (env CAIRN_DATA_DIR; "
        f"default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--database",
        dest="database_url",
        default=env_default("DATABASE_URL"),
        help="SQLAlchemy URL of a PostgreSQL database, e.g. "
        "postgresql://user@host/db; default: SQLite in the data directory "
        "(env CAIRN_DATABASE_URL)",
    )


@dataclass(frozen=True, slots=True)
class StorageSettings:
    data_dir: Path
    database_url: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StorageSettings:
        return cls(data_dir=args.data_dir, database_url=args.database_url)


def parse_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets) into host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(
            f"invalid listen address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:5000"
        )
    return host.strip("[]"), int(port)
