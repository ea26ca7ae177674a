"""The projection interface and the functions that drive every projection."""

from __future__ import annotations

import functools
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.events import EventType, StoredEvent
from engine.prepared import Prepared, in_list
from engine.tables import projection_checkpoints


class FoldEvent(NamedTuple):
    """The fields of an event that projections read, as a full rebuild
    passes them: ``time`` is the database's own value, written back as is.

    On SQLite that value is the stored text (naive UTC). On PostgreSQL it is
    the timestamptz as text in UTC, because a replay sets the transaction's
    TimeZone to UTC.
    """

    position: int
    repository: str
    type: EventType
    time: Any
    actor_user: str | None
    payload: dict[str, Any]


class FoldRows(NamedTuple):
    """Rows of one table that a folded state represents, each a tuple of
    values in ``columns`` order. JSON columns contain the decoded value.

    Columns left out are NULL in the written rows, because no projection
    column has a default.
    Projections yield rows in primary key order where that is cheap, because
    each insert then lands next to the previous one in the key's B-tree. On
    SQLite, inserting the 600,000 blob_links rows of bench/rebuild.py took
    1.2 s of CPU in key order and 1.5 s in log order.
    """

    table: sa.Table
    columns: tuple[str, ...]
    rows: Iterable[tuple[Any, ...]]


def rows_by_key(
    state: dict[Any, dict[Any, tuple[Any, ...]]],
) -> Iterator[tuple[Any, ...]]:
    """Yield the rows of a state that maps a key's first column to its second
    and then to the row, in the order of the two columns.

    Sorting the thousands of small dicts took about a fifth of the time of
    sorting one dict of every row by its whole key.
    """
    row = operator.itemgetter(1)
    for first in sorted(state):
        # The keys of a dict are unique, so the sort never compares rows.
        yield from map(row, sorted(state[first].items()))


class Projection(ABC):
    """A view of the log kept in SQL tables.

    ``apply`` must be deterministic given the event and the tables' current
    state, so replaying the log from position 1 rebuilds the same rows.
    """

    name: ClassVar[str]
    tables: ClassVar[tuple[sa.Table, ...]]
    handles: ClassVar[frozenset[EventType]]

    @abstractmethod
    def apply(self, conn: Connection, event: StoredEvent) -> None:
        """Update this projection's tables for one event."""

    def apply_all(self, conn: Connection, events: Sequence[StoredEvent]) -> None:
        """Update this projection's tables for the events of one append, in
        order. A projection may override it to write each row once."""
        for event in events:
            self.apply(conn, event)

    @abstractmethod
    def fold(self, state: dict[Any, Any], events: Sequence[FoldEvent]) -> None:
        """Apply events to an in-memory state, for a full rebuild.

        A rebuild calls this once per page of the log, in log order, with
        only the events whose type is in ``handles``. Folding the whole log
        and then writing ``rows(state)`` must produce exactly the rows that
        ``apply`` produces event by event. The rebuild property test checks
        that the two agree.
        """

    @abstractmethod
    def rows(self, state: dict[Any, Any]) -> Iterator[FoldRows]:
        """Yield the rows that a folded state represents, one table at a time."""


def apply_events(
    conn: Connection, projections: Sequence[Projection], events: Iterable[StoredEvent]
) -> int:
    """Apply ``events`` to each projection that handles them and move the
    projections' checkpoints to the last position. Return that position."""
    # Each projection writes only its own tables and reads only them, so
    # applying them one after another gives the same rows as interleaving
    # them. TagHistoryProjection also reads the manifests table, and its
    # apply_all explains why the order does not change its rows.
    batch = list(events)
    for projection in projections:
        handled = [event for event in batch if event.type in projection.handles]
        if handled:
            projection.apply_all(conn, handled)
    last = batch[-1].position if batch else 0
    if last:
        save_checkpoints(conn, projections, last)
    return last


@functools.lru_cache(maxsize=16)
def _save_checkpoints_statement(count: int) -> Prepared:
    return Prepared(
        sa.update(projection_checkpoints)
        .where(in_list(projection_checkpoints.c.name, "b_name", count))
        .values(position=sa.bindparam("b_position"))
    )


def save_checkpoints(
    conn: Connection, projections: Sequence[Projection], position: int
) -> None:
    names = [projection.name for projection in projections]
    params: dict[str, Any] = {"b_position": position}
    params.update((f"b_name_{i}", name) for i, name in enumerate(names))
    updated = _save_checkpoints_statement(len(names)).execute(conn, params).rowcount
    if updated != len(names):
        present = set(
            conn.execute(
                sa.select(projection_checkpoints.c.name).where(
                    projection_checkpoints.c.name.in_(names)
                )
            ).scalars()
        )
        conn.execute(
            sa.insert(projection_checkpoints),
            [{"name": n, "position": position} for n in names if n not in present],
        )


def checkpoints(conn: Connection) -> dict[str, int]:
    rows = conn.execute(sa.select(projection_checkpoints))
    return {row.name: row.position for row in rows}
