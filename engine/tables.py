"""Every SQL table cairn uses, in one place.

Alembic migrations are the only source of the schema in a database. These
definitions mirror them so that queries can be written with SQLAlchemy Core,
and a test checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class bytewise(FunctionElement[str]):
    """A string expression that compares and sorts by its bytes.

    The OCI distribution specification requires tags in lexical order, and
    its conformance tests accept byte order or case-insensitive order.
    PostgreSQL compares text by the database's collation, and a locale such
    as en_US.UTF-8 follows neither, so there this adds COLLATE "C". SQLite's
    default BINARY collation already compares the bytes of UTF-8 text.
    """

    type = sa.String()
    name = "bytewise"
    inherit_cache = True


@compiles(bytewise)
def _compile_bytewise(element: bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(bytewise, "postgresql")
def _compile_bytewise_postgresql(
    element: bytewise, compiler: SQLCompiler, **kw: Any
) -> str:
    return f'({compiler.process(element.clauses, **kw)}) COLLATE "C"'


# PostgreSQL indexes on (tag COLLATE "C") and (name COLLATE "C") that serve
# the bytewise listings, made by migrations 0008, 0009 and 0010. Alembic
# reflects them as plain column indexes, so tests/test_schema.py checks them
# on its own.
BYTE_ORDER_INDEXES = frozenset(
    {
        "ix_tags_repository_tag_bytes",
        "ix_repositories_name_bytes",
        "ix_tag_history_repository_tag_bytes",
        "ix_repositories_blob_bytes_name_bytes",
        "ix_repositories_pushed_bytes_name_bytes",
        "ix_repositories_tag_count_name_bytes",
    }
)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no timezone type, so values are stored as naive UTC and given
    their zone back when read; PostgreSQL stores timestamptz.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


# none_as_null stores Python None as SQL NULL rather than the JSON text "null".
JSONDocument = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# ---- the log --------------------------------------------------------------

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("id", sa.Uuid, nullable=False, unique=True),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("time", UTCDateTime, nullable=False),
    sa.Column("actor_user", sa.String(255)),
    sa.Column("actor_address", sa.String(255)),
    sa.Column("request_id", sa.String(64)),
    sa.Column("payload", JSONDocument, nullable=False),
    sa.Column("previous_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.UniqueConstraint("repository", "version"),
    sa.Index(None, "type", "position"),
    sa.Index(None, "time"),
    # The event feed's filters, each read newest first.
    sa.Index(None, "repository", "position"),
    sa.Index(None, "actor_user", "position"),
    sa.Index(None, "actor_address", "position"),
)

# One row (id 1): the last position and hash. Appends lock it, which
# serialises them and keeps positions gap-free in commit order.
log_head = sa.Table(
    "log_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# Each repository's stream version: the number of events it has.
streams = sa.Table(
    "streams",
    metadata,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

# ---- content that is not a projection ---------------------------------------

# Manifest bytes, exactly as pushed, shared by every repository that has them.
manifest_contents = sa.Table(
    "manifest_contents",
    metadata,
    sa.Column("digest", sa.String(140), primary_key=True),
    sa.Column("content", sa.LargeBinary, nullable=False),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# ---- projections ------------------------------------------------------------

# blob_links, tags and tag_history are WITHOUT ROWID tables on SQLite, which
# stores their small rows in the primary key's B-tree, with no second B-tree
# for a rowid. Migration 0003 has the sizes that this saved.

repositories = sa.Table(
    "repositories",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("created_position", sa.BigInteger, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("last_actor", sa.String(255)),
    sa.Column("tag_count", sa.Integer, nullable=False),
    sa.Column("manifest_count", sa.Integer, nullable=False),
    # Bytes of the blobs linked into the repository, each counted once.
    sa.Column("blob_bytes", sa.BigInteger, nullable=False),
    # Bytes as pushed: every manifest with its config and layers, shared
    # layers counted once per manifest.
    sa.Column("pushed_bytes", sa.BigInteger, nullable=False),
    # The sort orders of the repository listing; name breaks ties. On
    # PostgreSQL the listing uses the indexes on (column, name COLLATE "C")
    # of BYTE_ORDER_INDEXES instead.
    sa.Index(None, "blob_bytes", "name"),
    sa.Index(None, "pushed_bytes", "name"),
    sa.Index(None, "tag_count", "name"),
    sa.Index(None, "updated_position"),
)

tags = sa.Table(
    "tags",
    metadata,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Column("digest", sa.String(140), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index(None, "repository", "digest"),
    sa.Index(None, "repository", "position"),
    sqlite_with_rowid=False,
)

manifests = sa.Table(
    "manifests",
    metadata,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("digest", sa.String(140), primary_key=True),
    sa.Column("media_type", sa.String(255), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("artifact_type", sa.String(255)),
    sa.Column("subject", sa.String(140)),
    sa.Column("references", JSONDocument, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("pushed_at", UTCDateTime, nullable=False),
    sa.Index(None, "position"),
    sa.Index(None, "repository", "position"),
)

blob_links = sa.Table(
    "blob_links",
    metadata,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("digest", sa.String(140), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("linked_at", UTCDateTime, nullable=False),
    sa.Index(None, "digest"),
    sqlite_with_rowid=False,
)

referrers = sa.Table(
    "referrers",
    metadata,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("subject", sa.String(140), primary_key=True),
    sa.Column("digest", sa.String(140), primary_key=True),
    sa.Column("media_type", sa.String(255), nullable=False),
    sa.Column("artifact_type", sa.String(255)),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("annotations", JSONDocument),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Index(None, "repository", "position"),
    # The referrers API pages through a subject's referrers in log order.
    sa.Index(None, "repository", "subject", "position"),
)

# Tag history: one row per digest a tag pointed to, over the half-open range
# of positions [from_position, to_position). to_position is NULL while the
# tag still points there. media_type and size are the manifest's when the
# tag was set, so they outlive its deletion. They are NULL when the
# repository held no manifest with that digest then.
tag_history = sa.Table(
    "tag_history",
    metadata,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Column("from_position", sa.BigInteger, primary_key=True),
    sa.Column("digest", sa.String(140), nullable=False),
    sa.Column("from_time", UTCDateTime, nullable=False),
    sa.Column("to_position", sa.BigInteger),
    sa.Column("to_time", UTCDateTime),
    sa.Column("actor_user", sa.String(255)),
    sa.Column("media_type", sa.String(255)),
    sa.Column("size", sa.BigInteger),
    sqlite_with_rowid=False,
)

# Events and bytes pushed per hour of event time (hours since the Unix epoch,
# UTC) and event type, over all repositories and per repository. ``bytes``
# counts what clients uploaded: the sizes of pushed blobs and manifests. Both
# keys start with the hour, and on SQLite the rows are stored in key order
# (WITHOUT ROWID), so a time range is one sequential read.
activity = sa.Table(
    "activity",
    metadata,
    sa.Column("hour", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(32), primary_key=True),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

repository_activity = sa.Table(
    "repository_activity",
    metadata,
    sa.Column("hour", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("type", sa.String(32), primary_key=True),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Index(None, "repository", "hour"),
    sqlite_with_rowid=False,
)

# The last log position each projection has applied.
projection_checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
)

# The bus relay's progress: the last position JetStream acknowledged. The
# generation is the fencing token of the row's writes. Each election of a
# leader and each reset increments it, and a relay writes the row only while
# it still has the generation it claimed (see engine.bus.checkpoint).
relay_checkpoints = sa.Table(
    "relay_checkpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False, server_default="0"),
)

# One row (id 1): the random id of this registry, created with the schema.
# Every server on the database reports it at /_cairn/registry, so a mirror
# can tell that its source and target are one registry.
registry_identity = sa.Table(
    "registry_identity",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("registry_id", sa.String(36), nullable=False),
)

PROJECTION_TABLES = (
    repositories,
    tags,
    manifests,
    blob_links,
    referrers,
    tag_history,
    activity,
    repository_activity,
)
