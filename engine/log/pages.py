"""Pages of events bounded by bytes as well as by count.

A ``manifest.pushed`` event carries the manifest's annotations, so one
event can be almost as large as the 4 MiB that a manifest may be. A page of
1000 such events would need gigabytes of memory to build, so the HTTP feeds
stop adding events to a page once its events reach MAX_PAGE_BYTES. The
encoded events of a page therefore total less than MAX_PAGE_BYTES plus the
size of its last event. A page that any event matches has at least one, so
a client that follows the pages always moves forward.

A page is read in two steps. The first reads only the position and the
stored payload size of each event, SIZE_BATCH_ROWS rows per fetch (through
a server-side cursor on PostgreSQL), and stops once the sizes reach the
budget. That bounds the memory of the second step, which reads the chosen
events whole, encodes them and stops at the budget again, counting encoded
bytes. The stored text has spaces that compact JSON lacks, and an encoder
may escape characters that the database stores unescaped, so a page can
end somewhat before its encoded events reach the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from engine.domain.events import StoredEvent
from engine.log.store import row_to_event
from engine.tables import events

MAX_PAGE_BYTES: Final = 4 * 1024 * 1024
# Rows of (position, size) that the first step fetches at a time. The
# database computes the size of every row it sends, so a small batch
# measures few events past the budget.
SIZE_BATCH_ROWS: Final = 32

Encoder = Callable[[dict[str, Any]], bytes]


class PayloadBytes(FunctionElement[int]):
    """The size in bytes of an event's payload as JSON text in UTF-8."""

    type = sa.BigInteger()
    inherit_cache = True


@compiles(PayloadBytes)
def _payload_bytes_sqlite(
    element: PayloadBytes, compiler: SQLCompiler, **kw: Any
) -> str:
    # SQLite stores the payload as TEXT, whose length() counts characters.
    return f"length(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


@compiles(PayloadBytes, "postgresql")
def _payload_bytes_postgresql(
    element: PayloadBytes, compiler: SQLCompiler, **kw: Any
) -> str:
    return f"octet_length(CAST({compiler.process(element.clauses, **kw)} AS TEXT))"


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of events, in the order of the statement that chose them."""

    events: list[StoredEvent]
    # Each event's to_json(), encoded by the page's encoder.
    encoded: list[bytes]
    # True when events past this page match the statement.
    more: bool


def select_sizes() -> sa.Select[Any]:
    """Start a ``sizes`` statement for ``read_page``: add its filters, order
    and limit."""
    return sa.select(events.c.position, PayloadBytes(events.c.payload).label("size"))


def read_after(
    conn: Connection,
    after: int,
    limit: int,
    encode: Encoder,
    *,
    repository: str | None = None,
    types: Sequence[str] = (),
) -> EventPage:
    """Read one page of the events after position ``after`` that match the
    filters, in log order."""
    query = select_sizes().where(events.c.position > sa.bindparam("b_after"))
    params: dict[str, Any] = {"b_after": after, "b_limit": limit}
    if repository is not None:
        query = query.where(events.c.repository == sa.bindparam("b_repository"))
        params["b_repository"] = repository
    if types:
        query = query.where(events.c.type.in_(sa.bindparam("b_types", expanding=True)))
        params["b_types"] = list(types)
    query = query.order_by(events.c.position).limit(sa.bindparam("b_limit"))
    return read_page(conn, query, params, limit, encode)


_BY_POSITION = sa.select(events).where(
    events.c.position.in_(sa.bindparam("b_positions", expanding=True))
)


def read_page(
    conn: Connection,
    sizes: sa.Select[Any],
    params: dict[str, Any],
    limit: int,
    encode: Encoder,
) -> EventPage:
    """Read at most ``limit`` events, fewer when they reach MAX_PAGE_BYTES.

    ``sizes`` selects ``position`` and ``size`` (``PayloadBytes`` of the
    payload) of the events the page may show, in the page's order, and is
    run with ``params``. Each event is encoded with ``encode``.
    """
    budget = MAX_PAGE_BYTES
    positions, more = _choose(conn, sizes, params, limit, budget)
    if not positions:
        return EventPage([], [], more)

    rows = {
        row.position: row
        for row in conn.execute(_BY_POSITION, {"b_positions": positions})
    }
    page: list[StoredEvent] = []
    encoded: list[bytes] = []
    total = 0
    for position in positions:
        if page and total >= budget:
            # The encoded events can be larger than the stored payloads, for
            # example when the encoder escapes non-ASCII characters.
            more = True
            break
        event = row_to_event(rows.pop(position))
        data = encode(event.to_json())
        page.append(event)
        encoded.append(data)
        total += len(data)
    return EventPage(page, encoded, more)


def _choose(
    conn: Connection,
    sizes: sa.Select[Any],
    params: dict[str, Any],
    limit: int,
    budget: int,
) -> tuple[list[int], bool]:
    """Return the positions of the page's events, and whether more follow."""
    positions: list[int] = []
    total = 0
    result = conn.execute(
        sizes, params, execution_options={"yield_per": SIZE_BATCH_ROWS}
    )
    try:
        for position, size in result:
            if len(positions) == limit or (positions and total >= budget):
                return positions, True
            positions.append(position)
            total += size
        return positions, False
    finally:
        result.close()
