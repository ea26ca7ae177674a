"""A repository's manifests and the graph of referrers over its subjects."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import format_time
from engine.queries.pages import Listing, Page, check_page_size
from engine.queries.tags import content_sizes, platforms, require_repository
from engine.tables import bytewise, manifests, referrers, tags

_MANIFESTS = (
    sa.select(manifests)
    .where(manifests.c.repository == sa.bindparam("b_repository"))
    .order_by(manifests.c.position.desc())
    .limit(sa.bindparam("b_limit"))
)
_MANIFESTS_BEFORE = _MANIFESTS.where(manifests.c.position < sa.bindparam("b_position"))
# The tags on each manifest, in byte order as the tag list sorts them.
_TAGS_OF = (
    sa.select(tags.c.digest, tags.c.tag)
    .where(
        (tags.c.repository == sa.bindparam("b_repository"))
        & tags.c.digest.in_(sa.bindparam("b_digests", expanding=True))
    )
    .order_by(bytewise(tags.c.tag))
)

_subject = manifests.alias("subject_manifest")
_REFERRERS = (
    sa.select(referrers, _subject.c.media_type.label("subject_media_type"))
    .select_from(referrers)
    .outerjoin(
        _subject,
        (_subject.c.repository == referrers.c.repository)
        & (_subject.c.digest == referrers.c.subject),
    )
    .where(referrers.c.repository == sa.bindparam("b_repository"))
    .order_by(referrers.c.position.desc())
    .limit(sa.bindparam("b_limit"))
)
_REFERRERS_BEFORE = _REFERRERS.where(referrers.c.position < sa.bindparam("b_position"))


def manifest_page(
    conn: Connection, repository: str, *, n: int = 100, cursor: str | None = None
) -> Page:
    """List a repository's manifests, newest first, with the tags on each."""
    check_page_size(n)
    listing = Listing("manifests", {"repository": repository})
    params: dict[str, Any] = {"b_repository": repository, "b_limit": n + 1}
    statement = _MANIFESTS
    if cursor is not None:
        (params["b_position"],) = listing.decode_cursor(cursor, (int,))
        statement = _MANIFESTS_BEFORE
    rows = conn.execute(statement, params).all()
    if not rows and cursor is None:
        require_repository(conn, repository)
    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        next_cursor = listing.encode_cursor(rows[-1].position)

    tagged: dict[str, list[str]] = {}
    if rows:
        found = conn.execute(
            _TAGS_OF,
            {"b_repository": repository, "b_digests": [row.digest for row in rows]},
        )
        for digest, name in found:
            tagged.setdefault(digest, []).append(name)
    sizes = content_sizes(conn, repository, rows)
    items = [
        {
            "digest": row.digest,
            "media_type": row.media_type,
            "artifact_type": row.artifact_type,
            "size": row.size,
            "content_size": sizes.get(row.digest),
            "subject": row.subject,
            "platforms": platforms(row.references),
            "tags": tagged.get(row.digest, []),
            "position": row.position,
            "pushed_at": format_time(row.pushed_at),
        }
        for row in rows
    ]
    return Page(items, next_cursor)


def referrer_page(
    conn: Connection, repository: str, *, n: int = 100, cursor: str | None = None
) -> Page:
    """List the repository's referrer edges, newest first: each manifest that
    names a subject, and whether that subject is in the repository."""
    check_page_size(n)
    listing = Listing("referrers", {"repository": repository})
    params: dict[str, Any] = {"b_repository": repository, "b_limit": n + 1}
    statement = _REFERRERS
    if cursor is not None:
        (params["b_position"],) = listing.decode_cursor(cursor, (int,))
        statement = _REFERRERS_BEFORE
    rows = conn.execute(statement, params).all()
    if not rows and cursor is None:
        require_repository(conn, repository)
    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        next_cursor = listing.encode_cursor(rows[-1].position)
    items = [
        {
            "subject": row.subject,
            "subject_media_type": row.subject_media_type,
            "subject_present": row.subject_media_type is not None,
            "digest": row.digest,
            "media_type": row.media_type,
            "artifact_type": row.artifact_type,
            "size": row.size,
            "annotations": row.annotations,
            "position": row.position,
        }
        for row in rows
    ]
    return Page(items, next_cursor)
