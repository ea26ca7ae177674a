"""Activity: events and uploaded bytes per hour and event type, over all
repositories and per repository, so a dashboard can chart a range without
reading the log itself."""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.prepared import Prepared
from engine.projections.base import FoldEvent, FoldRows, Projection
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
        Prepared(_upsert(dialect, activity, ["hour", "type"])),
        Prepared(_upsert(dialect, repository_activity, ["hour", "repository", "type"])),
    )
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
}


def epoch_hour(moment: datetime | str) -> int:
    """Return the whole hours between the Unix epoch and ``moment`` (UTC).

    A string is a timestamp as a full rebuild passes it: the text SQLite
    stores (naive UTC) or PostgreSQL's ISO text in UTC. Both start with
    "YYYY-MM-DD HH".
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
        self.apply_all(conn, [event])

    def apply_all(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        # One upsert per table and key, however many events share the key.
        totals: dict[tuple[int, str, str], list[int]] = {}
        for event in events:
            key = (epoch_hour(event.time), event.repository, str(event.type))
            counts = totals.setdefault(key, [0, 0])
            counts[0] += 1
            counts[1] += uploaded_bytes(event.type, event.payload)
        overall_totals: dict[tuple[int, str], list[int]] = {}
        for (hour, _repository, event_type), (count, size) in totals.items():
            counts = overall_totals.setdefault((hour, event_type), [0, 0])
            counts[0] += count
            counts[1] += size
        overall, per_repository = _UPSERTS[conn.dialect.name]
        overall.executemany(
            conn,
            [
                {"hour": hour, "type": event_type, "events": count, "bytes": size}
                for (hour, event_type), (count, size) in overall_totals.items()
            ],
        )
        per_repository.executemany(
            conn,
            [
                {
                    "hour": hour,
                    "repository": repository,
                    "type": event_type,
                    "events": count,
                    "bytes": size,
                }
                for (hour, repository, event_type), (count, size) in totals.items()
            ],
        )

    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        # Only the per-repository totals are kept: rows() sums them into the
        # overall ones, because every event counts in both.
        last_moment = None
        hour = 0
        for _position, repository, event_type, moment, _user, payload in events:
            # Consecutive events often share a time (one append stamps all of
            # its events with one), so the hour is computed once for them.
            if moment != last_moment:
                hour = epoch_hour(moment)
                last_moment = moment
            size = int(payload["size"]) if event_type in UPLOAD_TYPES else 0
            key = (hour, repository, event_type)
            totals = state.get(key)
            if totals is None:
                state[key] = [1, size]
            else:
                totals[0] += 1
                totals[1] += size

    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        overall: dict[tuple[int, str], list[int]] = {}
        per_repository = []
        for (hour, repository, event_type), (events, size) in state.items():
            name = str(event_type)
            per_repository.append((hour, repository, name, events, size))
            totals = overall.get((hour, name))
            if totals is None:
                overall[hour, name] = [events, size]
            else:
                totals[0] += events
                totals[1] += size
        # Both lists start with their table's primary key, so sorting them
        # puts the rows in key order.
        yield FoldRows(
            activity,
            ("hour", "type", "events", "bytes"),
            sorted(
                (hour, name, events, size)
                for (hour, name), (events, size) in overall.items()
            ),
        )
        per_repository.sort()
        yield FoldRows(
            repository_activity,
            ("hour", "repository", "type", "events", "bytes"),
            per_repository,
        )
