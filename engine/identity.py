"""The registry id: a random UUID that distinguishes one registry from another.

Migration 0005 creates it. Every server on the same database reports the
same id, and a copy of the database made with a backup reports it too.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from engine.db import Database
from engine.tables import registry_identity

_SELECT = sa.select(registry_identity.c.registry_id).where(registry_identity.c.id == 1)


def load_registry_id(database: Database) -> str:
    """Return the registry id, creating it if its row is missing.

    The row is missing only when someone emptied the table. Concurrent
    servers then race to insert it, and all of them read the winner's id.
    """
    with database.read() as conn:
        stored = conn.execute(_SELECT).scalar_one_or_none()
    if stored is not None:
        return str(stored)
    dialect = sqlite if database.is_sqlite else postgresql
    insert = (
        dialect.insert(registry_identity)
        .values(id=1, registry_id=str(uuid.uuid4()))
        .on_conflict_do_nothing(index_elements=["id"])
    )
    with database.transaction() as conn:
        conn.execute(insert)
    with database.read() as conn:
        return str(conn.execute(_SELECT).scalar_one())


# The file in a data directory that names the registry whose blobs it holds.
DATA_DIR_ID_FILE = "registry-id"


class DataDirMismatch(Exception):
    """A data directory that belongs to another registry, or that cannot be
    shown to belong to this one."""


def bind_data_dir(
    data_dir: Path, registry_id: str, *, adopt: bool, require: bool
) -> None:
    """Check that ``data_dir`` contains the blobs of the registry ``registry_id``.

    The directory's ``registry-id`` file names its registry. A file that
    names another registry raises DataDirMismatch, because blob files are
    kept or removed by what that registry's database links. Without the
    file, ``adopt`` writes it, and otherwise ``require`` raises
    DataDirMismatch for a directory that already contains blob files.
    """
    path = data_dir / DATA_DIR_ID_FILE
    try:
        recorded = path.read_text().strip()
    except FileNotFoundError:
        recorded = None
    if recorded is not None:
        if recorded != registry_id:
            raise DataDirMismatch(
                f"data directory {data_dir} contains the blobs of registry "
                f"{recorded}, but the database is registry {registry_id}: "
                "point --data-dir and --database at the same registry"
            )
        return
    if adopt:
        _write_id_file(path, registry_id)
        return
    if require and any((data_dir / "blobs").glob("*/*/*")):
        raise DataDirMismatch(
            f"data directory {data_dir} has no {DATA_DIR_ID_FILE} file, so "
            "nothing shows that its blobs belong to this database. Start "
            "cairn serve once with this --data-dir and --database, which "
            "records it"
        )


def _write_id_file(path: Path, registry_id: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as stream:
        stream.write(registry_id + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
