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
from engine.tables import blob_links, registry_identity

_SELECT = sa.select(registry_identity.c.registry_id).where(registry_identity.c.id == 1)


class MissingRegistryId(Exception):
    """A database opened read-only whose registry id row is missing."""


def load_registry_id(database: Database) -> str:
    """Return the registry id, creating it if its row is missing.

    The row is missing only when someone emptied the table. Concurrent
    servers then race to insert it, and all of them read the winner's id.
    A database opened read-only raises MissingRegistryId instead.
    """
    with database.read() as conn:
        stored = conn.execute(_SELECT).scalar_one_or_none()
    if stored is not None:
        return str(stored)
    if database.read_only is not None:
        raise MissingRegistryId()
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


# How many blob files adopting a data directory looks up in the database.
ADOPTION_SAMPLE = 64


def recorded_registry_id(data_dir: Path) -> str | None:
    """Return the registry id that ``data_dir``'s file names, None without one."""
    try:
        return (data_dir / DATA_DIR_ID_FILE).read_text().strip()
    except FileNotFoundError:
        return None


def bind_data_dir(
    data_dir: Path,
    registry_id: str,
    *,
    adopt: bool,
    require: bool,
    database: Database | None = None,
) -> None:
    """Check that ``data_dir`` contains the blobs of the registry ``registry_id``.

    The directory's ``registry-id`` file names its registry. A file that
    names another registry raises DataDirMismatch, because blob files are
    kept or removed by what that registry's database links. Without the
    file, ``adopt`` writes it, and otherwise ``require`` raises
    DataDirMismatch for a directory that already contains blob files.
    Given ``database``, adopting a directory with blob files first looks up
    up to ADOPTION_SAMPLE of them there, and raises DataDirMismatch when the
    database links none: it is then a new or another registry's database,
    whose gc would remove them all.
    """
    path = data_dir / DATA_DIR_ID_FILE
    recorded = recorded_registry_id(data_dir)
    if recorded is not None:
        if recorded != registry_id:
            raise DataDirMismatch(
                f"data directory {data_dir} contains the blobs of registry "
                f"{recorded}, but the database is registry {registry_id}: "
                "point --data-dir and --database at the same registry"
            )
        return
    if adopt:
        if database is not None:
            _check_adoption(data_dir, database)
        _write_id_file(path, registry_id)
        return
    if require and any((data_dir / "blobs").glob("*/*/*")):
        raise DataDirMismatch(
            f"data directory {data_dir} has no {DATA_DIR_ID_FILE} file, so "
            "nothing shows that its blobs belong to this database. Start "
            "cairn serve once with this --data-dir and --database, which "
            "records it"
        )


def _check_adoption(data_dir: Path, database: Database) -> None:
    """Raise DataDirMismatch when ``data_dir`` has blob files and ``database``
    links none of the first ADOPTION_SAMPLE of them."""
    sample = []
    for blob in (data_dir / "blobs").glob("*/*/*"):
        sample.append(f"{blob.parent.parent.name}:{blob.name}")
        if len(sample) == ADOPTION_SAMPLE:
            break
    if not sample:
        return
    linked = sa.select(blob_links.c.digest).where(blob_links.c.digest.in_(sample))
    with database.read() as conn:
        if conn.execute(linked.limit(1)).first() is not None:
            return
    raise DataDirMismatch(
        f"data directory {data_dir} has no {DATA_DIR_ID_FILE} file, and the "
        f"database links none of the {len(sample)} blob files looked up in "
        "it, so the directory belongs to another registry and this "
        "database's gc would remove its blobs: point --data-dir and "
        "--database at the same registry, or give a new registry an empty "
        "data directory"
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
