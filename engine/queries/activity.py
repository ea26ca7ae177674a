"""Activity over time and the top repositories, from the activity projection."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.errors import Unsupported
from engine.domain.events import EventType, format_time
from engine.projections.activity import SECONDS_PER_HOUR, epoch_hour
from engine.queries.repositories import repository_json
from engine.queries.tags import require_repository
from engine.tables import activity as activity_table
from engine.tables import bytewise, repositories, repository_activity

# Bucket name -> width in hours. Buckets are aligned to UTC.
BUCKETS: Final = {"hour": 1, "day": 24}
MAX_BUCKETS: Final = 2000
MAX_TOP: Final = 100
TOP_ORDERS: Final = ("size", "activity")

_PUSHES: Final = frozenset({EventType.MANIFEST_PUSHED})
_DELETES: Final = frozenset(
    {EventType.MANIFEST_DELETED, EventType.TAG_DELETED, EventType.BLOB_DELETED}
)


@functools.cache
def _series_statement(width: int, per_repository: bool) -> sa.Select[Any]:
    table = repository_activity if per_repository else activity_table
    hour = table.c.hour
    # The width is a literal, not a parameter, so that PostgreSQL sees the
    # same expression in the select list and in GROUP BY.
    start = (hour - hour % sa.literal_column(str(width), sa.Integer)).label("start")
    query = (
        sa.select(
            start,
            table.c.type,
            sa.func.sum(table.c.events).label("events"),
            sa.func.sum(table.c.bytes).label("bytes"),
        )
        .where(hour >= sa.bindparam("b_from"))
        .where(hour < sa.bindparam("b_to"))
        .group_by(start, table.c.type)
    )
    if per_repository:
        query = query.where(table.c.repository == sa.bindparam("b_repository"))
    return query


_TOP_BY_SIZE = (
    sa.select(repositories)
    .order_by(repositories.c.blob_bytes.desc(), bytewise(repositories.c.name).desc())
    .limit(sa.bindparam("b_limit"))
)
_events_sum = sa.func.sum(repository_activity.c.events)
_TOP_BY_ACTIVITY = (
    sa.select(
        repository_activity.c.repository,
        _events_sum.label("events"),
        sa.func.sum(
            sa.case(
                (
                    repository_activity.c.type == str(EventType.MANIFEST_PUSHED),
                    repository_activity.c.events,
                ),
                else_=0,
            )
        ).label("pushes"),
        sa.func.sum(repository_activity.c.bytes).label("bytes"),
    )
    .where(repository_activity.c.hour >= sa.bindparam("b_from"))
    .where(repository_activity.c.hour < sa.bindparam("b_to"))
    .group_by(repository_activity.c.repository)
    .order_by(_events_sum.desc(), bytewise(repository_activity.c.repository))
    .limit(sa.bindparam("b_limit"))
)


def _hour_time(hour: int) -> str:
    return format_time(datetime.fromtimestamp(hour * SECONDS_PER_HOUR, UTC))


def default_until(since: datetime | None) -> datetime:
    """Return the end of a time range that gives no ``until``: now, or
    ``since`` when that is later, as from a client whose clock runs ahead
    of the server's."""
    now = datetime.now(UTC)
    if since is not None and since > now:
        return since
    return now


def hour_range(since: datetime, until: datetime, width: int) -> tuple[int, int]:
    """Return [first, end) in epoch hours: whole buckets of ``width`` hours
    from the one that contains ``since`` to the one that contains ``until``."""
    if until < since:
        raise Unsupported(
            "until is before since",
            {"since": format_time(since), "until": format_time(until)},
        )
    first = epoch_hour(since)
    first -= first % width
    end = epoch_hour(until) + 1
    end += -end % width
    return first, end


def _empty_bucket(start: int) -> dict[str, Any]:
    return {
        "start": _hour_time(start),
        "events": 0,
        "pushes": 0,
        "deletes": 0,
        "bytes_pushed": 0,
        "by_type": {},
    }


def _add(bucket: dict[str, Any], event_type: str, events: int, size: int) -> None:
    bucket["events"] += events
    bucket["bytes_pushed"] += size
    if event_type in _PUSHES:
        bucket["pushes"] += events
    if event_type in _DELETES:
        bucket["deletes"] += events
    bucket["by_type"][event_type] = bucket["by_type"].get(event_type, 0) + events


def activity(
    conn: Connection,
    *,
    since: datetime,
    until: datetime,
    bucket: str = "hour",
    repository: str | None = None,
) -> dict[str, Any]:
    """Count events, pushes (manifest.pushed), deletes (manifest, tag and
    blob deletions) and uploaded bytes per bucket of event time.

    Every bucket in the range is listed, empty ones with zeros, so the
    series can be charted as it is.
    """
    width = BUCKETS.get(bucket)
    if width is None:
        raise Unsupported(
            "unknown bucket",
            {"parameter": "bucket", "value": bucket, "supported": list(BUCKETS)},
        )
    first, end = hour_range(since, until, width)
    count = (end - first) // width
    if count > MAX_BUCKETS:
        raise Unsupported(
            f"the range spans {count} buckets, more than {MAX_BUCKETS}; "
            "narrow it or use a wider bucket",
            {"since": format_time(since), "until": format_time(until)},
        )

    params: dict[str, Any] = {"b_from": first, "b_to": end}
    if repository is not None:
        require_repository(conn, repository)
        params["b_repository"] = repository
    rows = conn.execute(_series_statement(width, repository is not None), params).all()

    buckets = {start: _empty_bucket(start) for start in range(first, end, width)}
    totals = _empty_bucket(first)
    del totals["start"]
    for row in rows:
        _add(buckets[row.start], row.type, int(row.events), int(row.bytes))
        _add(totals, row.type, int(row.events), int(row.bytes))
    return {
        "bucket": bucket,
        "repository": repository,
        "since": _hour_time(first),
        "until": _hour_time(end),
        "buckets": list(buckets.values()),
        "totals": totals,
    }


def top_repositories(
    conn: Connection,
    *,
    by: str = "size",
    n: int = 10,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """List the ``n`` largest repositories (stored bytes), or the ``n`` with
    the most events between ``since`` and ``until``."""
    if by not in TOP_ORDERS:
        raise Unsupported(
            "unknown order", {"parameter": "by", "value": by, "supported": TOP_ORDERS}
        )
    if not 1 <= n <= MAX_TOP:
        raise Unsupported(
            f"n must be an integer from 1 to {MAX_TOP}", {"parameter": "n", "value": n}
        )
    if by == "size":
        rows = conn.execute(_TOP_BY_SIZE, {"b_limit": n}).all()
        return {"by": by, "repositories": [repository_json(row) for row in rows]}

    until = until or default_until(since)
    since = since or until - timedelta(days=7)
    first, end = hour_range(since, until, 1)
    rows = conn.execute(
        _TOP_BY_ACTIVITY, {"b_from": first, "b_to": end, "b_limit": n}
    ).all()
    return {
        "by": by,
        "since": _hour_time(first),
        "until": _hour_time(end),
        "repositories": [
            {
                "name": row.repository,
                "events": int(row.events),
                "pushes": int(row.pushes),
                "bytes_pushed": int(row.bytes),
            }
            for row in rows
        ],
    }
