"""Repositories: the sortable listing, one repository, the catalog at a position."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.errors import NameUnknown, Unsupported
from engine.domain.events import format_time
from engine.queries.pages import Listing, Page, check_page_size, point_parameters
from engine.tables import bytewise, repositories

# Sort name -> column. Every column has an index whose last column is the
# name, so each page is one index range scan. On PostgreSQL those indexes
# are on (name COLLATE "C") and (column, name COLLATE "C"), from migrations
# 0008 and 0009. updated_position, the position of the repository's last
# event, is unique, so its index needs no name.
SORTS: Final = {
    "name": repositories.c.name,
    "size": repositories.c.blob_bytes,
    "pushed_size": repositories.c.pushed_bytes,
    "tags": repositories.c.tag_count,
    "last_push": repositories.c.updated_position,
}

_ROW = sa.select(repositories).where(repositories.c.name == sa.bindparam("b_name"))
_COUNT = sa.select(sa.func.count()).select_from(repositories)
_COUNT_PREFIX = _COUNT.where(
    repositories.c.name.like(sa.bindparam("b_pattern"), escape="\\")
)


def like_prefix(prefix: str) -> str:
    """Return a LIKE pattern matching names that start with ``prefix``."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def repository_json(row: Any) -> dict[str, Any]:
    return {
        "name": row.name,
        "tag_count": row.tag_count,
        "manifest_count": row.manifest_count,
        "stored_bytes": row.blob_bytes,
        "pushed_bytes": row.pushed_bytes,
        "created_at": format_time(row.created_at),
        "created_position": row.created_position,
        "updated_at": format_time(row.updated_at),
        "updated_position": row.updated_position,
        "last_actor": row.last_actor,
    }


@functools.cache
def _page_statement(
    sort: str, descending: bool, with_prefix: bool, with_cursor: bool
) -> sa.Select[Any]:
    """Build, once per combination, the statement for one listing page."""
    key = SORTS[sort]
    name = repositories.c.name
    query = sa.select(repositories)
    if with_prefix:
        query = query.where(name.like(sa.bindparam("b_pattern"), escape="\\"))
    # Names sort by their bytes, as in the catalog, whatever the database's
    # collation, and so do the names that break ties on other columns.
    by_bytes = bytewise(name)
    if with_cursor:
        after = bytewise(sa.bindparam("b_name", type_=name.type))
        if sort == "name":
            query = query.where(by_bytes < after if descending else by_bytes > after)
        else:
            # Ties on the sort column are broken by name, in the same
            # direction, so the pair is a row-value comparison.
            pair = sa.tuple_(key, by_bytes)
            bound = sa.tuple_(sa.bindparam("b_value", type_=key.type), after)
            query = query.where(pair < bound if descending else pair > bound)
    order: list[sa.ColumnElement[Any]]
    if sort == "name":
        order = [by_bytes.desc() if descending else by_bytes]
    else:
        order = [key.desc(), by_bytes.desc()] if descending else [key, by_bytes]
    return query.order_by(*order).limit(sa.bindparam("b_limit"))


def repository_page(
    conn: Connection,
    *,
    sort: str = "name",
    descending: bool = False,
    prefix: str | None = None,
    n: int = 100,
    cursor: str | None = None,
) -> Page:
    """List repositories in ``sort`` order, ``n`` at a time.

    ``prefix`` keeps the names that start with it. The page's ``extra``
    carries ``total``, the number of repositories that match.
    """
    if sort not in SORTS:
        raise Unsupported(
            "unknown sort order",
            {"parameter": "sort", "value": sort, "supported": sorted(SORTS)},
        )
    check_page_size(n)
    listing = Listing(
        "repositories",
        {
            "sort": sort,
            "order": "desc" if descending else "asc",
            "prefix": prefix or None,
        },
    )
    params: dict[str, Any] = {"b_limit": n + 1}
    if prefix:
        params["b_pattern"] = like_prefix(prefix)
    if cursor is not None:
        params["b_value"], params["b_name"] = listing.decode_cursor(cursor, (int, str))
        if sort == "name":
            del params["b_value"]

    statement = _page_statement(sort, descending, bool(prefix), cursor is not None)
    rows = conn.execute(statement, params).all()
    if prefix:
        counted = conn.execute(_COUNT_PREFIX, {"b_pattern": params["b_pattern"]})
    else:
        counted = conn.execute(_COUNT)
    total = counted.scalar_one()

    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        last = rows[-1]
        value = 0 if sort == "name" else getattr(last, SORTS[sort].name)
        next_cursor = listing.encode_cursor(value, last.name)
    return Page([repository_json(row) for row in rows], next_cursor, {"total": total})


def repository(conn: Connection, name: str) -> dict[str, Any]:
    """Return one repository's counts and sizes; NameUnknown when it has none."""
    row = conn.execute(_ROW, {"b_name": name}).one_or_none()
    if row is None:
        raise NameUnknown("repository name not known to registry", {"name": name})
    return repository_json(row)


_CATALOG_AT = (
    sa.select(
        repositories.c.name, repositories.c.created_at, repositories.c.created_position
    )
    .where(repositories.c.created_position <= sa.bindparam("b_position"))
    .order_by(bytewise(repositories.c.name))
    .limit(sa.bindparam("b_limit"))
)
_CATALOG_AT_AFTER = _CATALOG_AT.where(
    bytewise(repositories.c.name) > bytewise(sa.bindparam("b_name"))
)


def catalog_at(
    conn: Connection,
    position: int,
    *,
    n: int = 100,
    cursor: str | None = None,
    point: Mapping[str, Any] | None = None,
) -> Page:
    """List the repositories that existed at ``position``, by the bytes of
    their names.

    A repository exists from its first event on; cairn has no event that
    removes one, so its first event's position decides. ``point`` is the
    request's ``at`` and ``position`` that chose ``position`` (see
    ``point_parameters``), and a cursor continues only the listing of the
    same point.
    """
    check_page_size(n)
    listing = Listing("catalog", point_parameters(position, point))
    params: dict[str, Any] = {"b_position": position, "b_limit": n + 1}
    statement = _CATALOG_AT
    if cursor is not None:
        (params["b_name"],) = listing.decode_cursor(cursor, (str,))
        statement = _CATALOG_AT_AFTER
    rows = conn.execute(statement, params).all()
    next_cursor = None
    if len(rows) > n:
        rows = rows[:n]
        next_cursor = listing.encode_cursor(rows[-1].name)
    items = [
        {
            "name": row.name,
            "created_at": format_time(row.created_at),
            "created_position": row.created_position,
        }
        for row in rows
    ]
    return Page(items, next_cursor)
