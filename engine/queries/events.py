"""The event feed for drill-down: newest first, filtered, a page at a time.

A page has at most ``n`` events and ends early once its events reach
engine.log.pages.MAX_PAGE_BYTES, so ``next_cursor`` can be set on a page of
fewer than ``n`` events.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine.domain.errors import Unsupported
from engine.domain.events import EventType
from engine.encoding import encode_json
from engine.log.pages import read_page, select_sizes
from engine.queries.pages import (
    MAX_INTEGER,
    Listing,
    Page,
    check_page_size,
)
from engine.queries.positions import position_at, position_before
from engine.tables import events

EVENT_TYPES: Final = frozenset(str(event_type) for event_type in EventType)


@functools.cache
def _statement(
    repository: bool, type_count: int, actor: bool, address_count: int
) -> sa.Select[Any]:
    """Build, once per set of filters, the statement that chooses the events
    of one feed page, as the ``sizes`` of ``read_page``.

    Each filter has an index on (column, position), so a page is one
    backwards range scan whatever the filter. Several types, or several
    spellings of an address, become one scan per value, merged by position,
    because with ``IN (...)`` PostgreSQL reads and sorts every matching
    event.
    """
    if type_count <= 1 and address_count <= 1:
        return _filtered(repository, type_count == 1, actor, address_count == 1)
    type_parameters = (
        [f"b_type_{index}" for index in range(type_count)]
        if type_count > 1
        else ["b_type"]
    )
    address_parameters = (
        [f"b_address_{index}" for index in range(address_count)]
        if address_count > 1
        else ["b_address"]
    )
    scans = [
        _filtered(
            repository,
            type_count >= 1,
            actor,
            address_count >= 1,
            type_parameter,
            address_parameter,
        ).subquery()
        for type_parameter in type_parameters
        for address_parameter in address_parameters
    ]
    merged = sa.union_all(*(sa.select(scan) for scan in scans)).subquery()
    return (
        sa.select(merged)
        .order_by(merged.c.position.desc())
        .limit(sa.bindparam("b_limit"))
    )


def _filtered(
    repository: bool,
    one_type: bool,
    actor: bool,
    address: bool,
    type_parameter: str = "b_type",
    address_parameter: str = "b_address",
) -> sa.Select[Any]:
    position = events.c.position
    query = (
        select_sizes()
        .where(position > sa.bindparam("b_low"))
        .where(position <= sa.bindparam("b_high"))
    )
    if repository:
        query = query.where(events.c.repository == sa.bindparam("b_repository"))
    if one_type:
        query = query.where(events.c.type == sa.bindparam(type_parameter))
    if actor:
        query = query.where(events.c.actor_user == sa.bindparam("b_actor"))
    if address:
        query = query.where(events.c.actor_address == sa.bindparam(address_parameter))
    return query.order_by(position.desc()).limit(sa.bindparam("b_limit"))


def event_page(
    conn: Connection,
    *,
    repository: str | None = None,
    types: Sequence[str] = (),
    actor: str | None = None,
    address: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    n: int = 100,
    cursor: str | None = None,
) -> Page:
    """List events newest first, keeping those that match every filter given.

    ``actor`` matches the authenticated user and ``address`` the client
    address, in the spelling that events record, which an IPv4 address also
    had in older records (see address_spellings). ``since`` (inclusive) and
    ``until`` (inclusive) bound the event time; they are mapped to positions
    first, so the scan stays on an index.
    """
    check_page_size(n)
    unknown = sorted(set(types) - EVENT_TYPES)
    if unknown:
        raise Unsupported(
            "unknown event type",
            {
                "parameter": "type",
                "value": unknown[0],
                "supported": sorted(EVENT_TYPES),
            },
        )
    listing = Listing(
        "events",
        {
            "repository": repository,
            "type": set(types),
            "actor": actor,
            "address": address,
            "since": since,
            "until": until,
        },
    )
    low = position_before(conn, since) if since is not None else 0
    high = position_at(conn, until) if until is not None else MAX_INTEGER
    if cursor is not None:
        (before,) = listing.decode_cursor(cursor, (int,))
        high = min(high, before - 1)

    distinct_types = sorted(set(types))
    params: dict[str, Any] = {"b_low": low, "b_high": high, "b_limit": n + 1}
    if repository is not None:
        params["b_repository"] = repository
    if len(distinct_types) == 1:
        params["b_type"] = distinct_types[0]
    else:
        for index, event_type in enumerate(distinct_types):
            params[f"b_type_{index}"] = event_type
    if actor is not None:
        params["b_actor"] = actor
    spellings = address_spellings(address) if address is not None else []
    if len(spellings) == 1:
        params["b_address"] = spellings[0]
    else:
        for index, spelling in enumerate(spellings):
            params[f"b_address_{index}"] = spelling

    statement = _statement(
        repository is not None,
        len(distinct_types),
        actor is not None,
        len(spellings),
    )
    page = read_page(conn, statement, params, n, encode_json)
    next_cursor = None
    if page.more:
        next_cursor = listing.encode_cursor(page.events[-1].position)
    return Page([event.to_json() for event in page.events], next_cursor)


def address_spellings(address: str) -> list[str]:
    """Return the spellings under which events may record ``address``.

    cairn records an IPv4-mapped IPv6 client address as its IPv4 address.
    Before it did, such an address was recorded as Python spelled it:
    ::ffff:c000:201 up to Python 3.12, ::ffff:192.0.2.1 from 3.13. An IPv4
    address therefore has those two spellings as well.
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return [address]
    if not isinstance(parsed, ipaddress.IPv4Address):
        return [address]
    value = int(parsed)
    return [
        address,
        f"::ffff:{value >> 16:x}:{value & 0xFFFF:x}",
        f"::ffff:{address}",
    ]
