"""Tags now and at any log position, and every digest a tag pointed to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.errors import ManifestUnknown, NameUnknown, Unsupported
from engine.domain.events import format_time
from engine.queries.pages import Listing, Page, check_page_size, point_parameters
from engine.tables import bytewise, events, manifests, repositories, tags
from engine.tables import tag_history as tag_history_table

# Reference kinds whose bytes are blobs, as the manifest.pushed event lists them.
BLOB_KINDS: Final = frozenset({"config", "layer"})
TAG_SORTS: Final = ("name", "recent")

_EXISTS = sa.select(repositories.c.name).where(
    repositories.c.name == sa.bindparam("b_repository")
)

_CURRENT = (
    sa.select(
        tags.c.tag,
        tags.c.digest,
        tags.c.position,
        tags.c.updated_at,
        manifests.c.media_type,
        manifests.c.size,
        manifests.c.artifact_type,
        manifests.c.references,
        events.c.actor_user,
        events.c.actor_address,
    )
    .select_from(tags)
    .outerjoin(
        manifests,
        (manifests.c.repository == tags.c.repository)
        & (manifests.c.digest == tags.c.digest),
    )
    .outerjoin(events, events.c.position == tags.c.position)
    .where(tags.c.repository == sa.bindparam("b_repository"))
)
# Tags sort by their bytes, as in the OCI tag list, whatever the database's
# collation.
_BY_NAME = _CURRENT.order_by(bytewise(tags.c.tag)).limit(sa.bindparam("b_limit"))
_BY_NAME_AFTER = _BY_NAME.where(bytewise(tags.c.tag) > bytewise(sa.bindparam("b_tag")))
_RECENT = _CURRENT.order_by(tags.c.position.desc()).limit(sa.bindparam("b_limit"))
_RECENT_BEFORE = _RECENT.where(tags.c.position < sa.bindparam("b_position"))
_ONE = _CURRENT.where(tags.c.tag == sa.bindparam("b_tag"))

_CHILDREN = sa.select(
    manifests.c.digest, manifests.c.size, manifests.c.references
).where(
    (manifests.c.repository == sa.bindparam("b_repository"))
    & manifests.c.digest.in_(sa.bindparam("b_digests", expanding=True))
)

_started = events.alias("started")
_ended = events.alias("ended")

_HISTORY = (
    sa.select(
        tag_history_table.c.tag,
        tag_history_table.c.digest,
        tag_history_table.c.from_position,
        tag_history_table.c.from_time,
        tag_history_table.c.to_position,
        tag_history_table.c.to_time,
        tag_history_table.c.actor_user,
        _started.c.actor_address,
        _ended.c.type.label("ended_type"),
        _ended.c.actor_user.label("ended_user"),
        _ended.c.actor_address.label("ended_address"),
        # The manifest's as the tag was set, also after it was deleted.
        tag_history_table.c.media_type,
        tag_history_table.c.size,
    )
    .select_from(tag_history_table)
    .outerjoin(_started, _started.c.position == tag_history_table.c.from_position)
    .outerjoin(_ended, _ended.c.position == tag_history_table.c.to_position)
    .where(tag_history_table.c.repository == sa.bindparam("b_repository"))
)
_TAG_HISTORY = (
    _HISTORY.where(tag_history_table.c.tag == sa.bindparam("b_tag"))
    .order_by(tag_history_table.c.from_position.desc())
    .limit(sa.bindparam("b_limit"))
)
_TAG_HISTORY_BEFORE = _TAG_HISTORY.where(
    tag_history_table.c.from_position < sa.bindparam("b_position")
)
# The primary key starts with (repository, tag), so the count scans only the
# tag's own entries, one per change.
_TAG_HISTORY_COUNT = (
    sa.select(sa.func.count())
    .select_from(tag_history_table)
    .where(
        (tag_history_table.c.repository == sa.bindparam("b_repository"))
        & (tag_history_table.c.tag == sa.bindparam("b_tag"))
    )
)
_TAG_AT = (
    _HISTORY.where(
        (tag_history_table.c.tag == sa.bindparam("b_tag"))
        & (tag_history_table.c.from_position <= sa.bindparam("b_position"))
    )
    .order_by(tag_history_table.c.from_position.desc())
    .limit(1)
)
# A range [from_position, to_position) contains the position. Tags sort by
# their bytes, as the present tags do.
_TAGS_AT = (
    _HISTORY.where(
        (tag_history_table.c.from_position <= sa.bindparam("b_position"))
        & (
            tag_history_table.c.to_position.is_(None)
            | (tag_history_table.c.to_position > sa.bindparam("b_position"))
        )
    )
    .order_by(bytewise(tag_history_table.c.tag))
    .limit(sa.bindparam("b_limit"))
)
_TAGS_AT_AFTER = _TAGS_AT.where(
    bytewise(tag_history_table.c.tag) > bytewise(sa.bindparam("b_tag"))
)


def _actor(user: str | None, address: str | None) -> dict[str, str | None]:
    return {"user": user, "address": address}


def platforms(references: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Return the platform of each child manifest an index lists."""
    return [
        {"digest": reference["digest"], **reference["platform"]}
        for reference in references or []
        if reference.get("kind") == "manifest" and reference.get("platform")
    ]


def _own_content_size(size: int, references: list[dict[str, Any]]) -> int:
    blobs: int = sum(r["size"] for r in references if r.get("kind") in BLOB_KINDS)
    return size + blobs


def content_sizes(
    conn: Connection, repository: str, rows: Sequence[Any]
) -> dict[str, int]:
    """Return, per manifest digest, its bytes with its config and layers; an
    index adds those of the children the repository holds."""
    sizes: dict[str, int] = {}
    children: set[str] = set()
    for row in rows:
        if row.size is None:
            continue
        sizes[row.digest] = _own_content_size(row.size, row.references)
        children.update(
            r["digest"] for r in row.references if r.get("kind") == "manifest"
        )
    if not children:
        return sizes
    child_sizes = {
        child.digest: _own_content_size(child.size, child.references)
        for child in conn.execute(
            _CHILDREN, {"b_repository": repository, "b_digests": sorted(children)}
        )
    }
    for row in rows:
        if row.size is None:
            continue
        sizes[row.digest] += sum(
            child_sizes.get(r["digest"], 0)
            for r in row.references
            if r.get("kind") == "manifest"
        )
    return sizes


def _current_json(row: Any, sizes: dict[str, int]) -> dict[str, Any]:
    return {
        "tag": row.tag,
        "digest": row.digest,
        "media_type": row.media_type,
        "artifact_type": row.artifact_type,
        "size": row.size,
        "content_size": sizes.get(row.digest),
        "platforms": platforms(row.references),
        "position": row.position,
        "pushed_at": format_time(row.updated_at),
        "pushed_by": _actor(row.actor_user, row.actor_address),
    }


def _history_json(row: Any, position: int | None = None) -> dict[str, Any]:
    """Describe a tag history entry as read now or, given ``position``, as
    read at that position.

    An entry that ends after ``position`` was still in force there, so it gets
    the shape of the entry in force now: no to_position, to_time or ended_by.
    """
    ended_later = (
        position is not None
        and row.to_position is not None
        and row.to_position > position
    )
    ended = None
    to_position = None
    to_time = None
    if row.to_position is not None and not ended_later:
        ended = {
            "type": row.ended_type,
            "actor": _actor(row.ended_user, row.ended_address),
        }
        to_position = row.to_position
        to_time = format_time(row.to_time) if row.to_time else None
    return {
        "tag": row.tag,
        "digest": row.digest,
        "media_type": row.media_type,
        "size": row.size,
        "from_position": row.from_position,
        "from_time": format_time(row.from_time),
        "to_position": to_position,
        "to_time": to_time,
        "actor": _actor(row.actor_user, row.actor_address),
        "ended_by": ended,
    }


def require_repository(conn: Connection, repository: str) -> None:
    if conn.execute(_EXISTS, {"b_repository": repository}).first() is None:
        raise NameUnknown("repository name not known to registry", {"name": repository})


def tag_page(
    conn: Connection,
    repository: str,
    *,
    sort: str = "name",
    n: int = 100,
    cursor: str | None = None,
) -> Page:
    """List a repository's tags by name or most recently set first, with the
    manifest each points to and who set it."""
    if sort not in TAG_SORTS:
        raise Unsupported(
            "unknown sort order",
            {"parameter": "sort", "value": sort, "supported": list(TAG_SORTS)},
        )
    check_page_size(n)
    listing = Listing("tags", {"repository": repository, "sort": sort})
    params: dict[str, Any] = {"b_repository": repository, "b_limit": n + 1}
    if sort == "name":
        statement = _BY_NAME
        if cursor is not None:
            (params["b_tag"],) = listing.decode_cursor(cursor, (str,))
            statement = _BY_NAME_AFTER
    else:
        statement = _RECENT
        if cursor is not None:
            (params["b_position"],) = listing.decode_cursor(cursor, (int,))
            statement = _RECENT_BEFORE
    rows = conn.execute(statement, params).all()
    if not rows and cursor is None:
        require_repository(conn, repository)

    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        last = rows[-1]
        next_cursor = listing.encode_cursor(
            last.tag if sort == "name" else last.position
        )
    sizes = content_sizes(conn, repository, rows)
    return Page([_current_json(row, sizes) for row in rows], next_cursor)


def tag(conn: Connection, repository: str, name: str) -> dict[str, Any]:
    """Return what ``name`` points to now; ManifestUnknown when it is not set."""
    row = conn.execute(_ONE, {"b_repository": repository, "b_tag": name}).first()
    if row is None:
        require_repository(conn, repository)
        raise ManifestUnknown("tag unknown", {"repository": repository, "tag": name})
    return _current_json(row, content_sizes(conn, repository, [row]))


def tag_at(
    conn: Connection, repository: str, name: str, position: int
) -> dict[str, Any]:
    """Return the history entry in force at ``position``; ManifestUnknown when
    the tag was not set then."""
    row = conn.execute(
        _TAG_AT, {"b_repository": repository, "b_tag": name, "b_position": position}
    ).first()
    if row is None or (row.to_position is not None and row.to_position <= position):
        require_repository(conn, repository)
        raise ManifestUnknown(
            "tag was not set at that position",
            {"repository": repository, "tag": name, "position": position},
        )
    return _history_json(row, position)


def tags_at(
    conn: Connection,
    repository: str,
    position: int,
    *,
    n: int = 100,
    cursor: str | None = None,
    point: Mapping[str, Any] | None = None,
) -> Page:
    """List the tags set at ``position``, by name in byte order, from the tag
    history.

    ``point`` is the request's ``at`` and ``position`` that chose
    ``position`` (see ``point_parameters``). A cursor continues only the
    listing of the same repository and point.
    """
    check_page_size(n)
    listing = Listing(
        "tags",
        {"repository": repository, "sort": "name"} | point_parameters(position, point),
    )
    params: dict[str, Any] = {
        "b_repository": repository,
        "b_position": position,
        "b_limit": n + 1,
    }
    statement = _TAGS_AT
    if cursor is not None:
        (params["b_tag"],) = listing.decode_cursor(cursor, (str,))
        statement = _TAGS_AT_AFTER
    rows = conn.execute(statement, params).all()
    if not rows and cursor is None:
        require_repository(conn, repository)
    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        next_cursor = listing.encode_cursor(rows[-1].tag)
    return Page([_history_json(row, position) for row in rows], next_cursor)


def tag_history(
    conn: Connection,
    repository: str,
    name: str,
    *,
    n: int = 100,
    cursor: str | None = None,
) -> Page:
    """List every digest ``name`` pointed to, newest first, each with its
    range of positions and times and who started and ended it.

    The page's ``extra`` carries ``total``, the number of entries in the
    whole history. It is counted on ``conn``, so a connection from
    ``snapshot`` gives a total from the same state as the page.
    """
    check_page_size(n)
    listing = Listing("tag history", {"repository": repository, "tag": name})
    params: dict[str, Any] = {"b_repository": repository, "b_tag": name}
    params["b_limit"] = n + 1
    statement = _TAG_HISTORY
    if cursor is not None:
        (params["b_position"],) = listing.decode_cursor(cursor, (int,))
        statement = _TAG_HISTORY_BEFORE
    rows = conn.execute(statement, params).all()
    if not rows and cursor is None:
        require_repository(conn, repository)
        raise ManifestUnknown(
            "tag has no history", {"repository": repository, "tag": name}
        )
    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        next_cursor = listing.encode_cursor(rows[-1].from_position)
    total = conn.execute(
        _TAG_HISTORY_COUNT, {"b_repository": repository, "b_tag": name}
    ).scalar_one()
    return Page([_history_json(row) for row in rows], next_cursor, {"total": total})
