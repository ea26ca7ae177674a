"""Activity: events and uploaded bytes per hour and event type, over all
repositories and per repository, so a dashboard can chart a range without
reading the log itself."""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.projections.base import FoldEvent, Projection
from engine.tables import activity, repository_activity

SECONDS_PER_HOUR = 3600

# Event types whose payload ``size`` is bytes a client uploaded.
UPLOAD_TYPES = frozenset({EventType.BLOB_PUSHED, EventType.MANIFEST_PUSHED})


def _upsert(dialect: Any, table: sa.Table, key: list[str]) -> Any:
    insert = dialect.insert(table)
    return insert.on_conflict_do_update(
        index_elements=key,
        set_={
            "events": table.c.events + insert.excluded.events,
            "bytes": table.c.bytes + insert.excluded.bytes,
        },
    )


# Both backends have INSERT ... ON CONFLICT DO UPDATE, with their own
# SQLAlchemy constructs; the statements are built once per backend.
_UPSERTS = {
    name: (
        _upsert(dialect, activity, ["hour", "type"]),
        _upsert(dialect, repository_activity, ["hour", "repository", "type"]),
    )
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
}


def epoch_hour(moment: datetime | str) -> int:
    """Return the whole hours between the Unix epoch and ``moment`` (UTC).

    A string is a timestamp as SQLite stores it (naive UTC), which is what a
    full rebuild passes.
    """
    if isinstance(moment, str):
        # "YYYY-MM-DD HH" names the hour; a rebuild meets each one many times.
        return _hour_of_prefix(moment[:13])
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return _hour_of_fields(moment.year, moment.month, moment.day, moment.hour)


@functools.lru_cache(maxsize=4096)
def _hour_of_prefix(prefix: str) -> int:
    moment = datetime.fromisoformat(prefix)
    return _hour_of_fields(moment.year, moment.month, moment.day, moment.hour)


@functools.lru_cache(maxsize=4096)
def _hour_of_fields(year: int, month: int, day: int, hour: int) -> int:
    return calendar.timegm((year, month, day, hour, 0, 0)) // SECONDS_PER_HOUR


def uploaded_bytes(event_type: EventType, payload: dict[str, Any]) -> int:
    return int(payload["size"]) if event_type in UPLOAD_TYPES else 0


class ActivityProjection(Projection):
    name = "activity"
    tables = (activity, repository_activity)
    handles = frozenset(EventType)

    def apply(self, conn: Connection, event: StoredEvent) -> None:
        overall, per_repository = _UPSERTS[conn.dialect.name]
        values = {
            "hour": epoch_hour(event.time),
            "type": str(event.type),
            "events": 1,
            "bytes": uploaded_bytes(event.type, event.payload),
        }
        conn.execute(overall, values)
        conn.execute(per_repository, {**values, "repository": event.repository})

    def fold(self, state: dict[Any, Any], event: FoldEvent) -> None:
        hour = epoch_hour(event.time)
        size = uploaded_bytes(event.type, event.payload)
        for key in ((hour, str(event.type)), (event.repository, hour, str(event.type))):
            totals = state.get(key)
            if totals is None:
                state[key] = [1, size]
            else:
                totals[0] += 1
                totals[1] += size

    def rows(self, state: dict[Any, Any]) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
        for key, (events, size) in state.items():
            if len(key) == 2:
                hour, event_type = key
                yield (
                    activity,
                    {"hour": hour, "type": event_type, "events": events, "bytes": size},
                )
            else:
                repository, hour, event_type = key
                yield (
                    repository_activity,
                    {
                        "repository": repository,
                        "hour": hour,
                        "type": event_type,
                        "events": events,
                        "bytes": size,
                    },
                )
