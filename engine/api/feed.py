"""GET /_cairn/events: the log itself, a page at a time, for replay over HTTP.

``after`` is the last position the consumer has seen (0 for the start),
``limit`` caps the page (at most MAX_LIMIT), ``repository`` and ``type``
(repeatable or comma-separated) filter it. ``next_after`` is the value to
send next. After a short page it is the log head as read before the page,
so a filtered consumer skips the events it does not want and misses none
that it does.

A ``limit`` above MAX_LIMIT gets a page of at most MAX_LIMIT events, as
``n`` above its maximum does on the tag list and the catalog. A page also
ends once its events reach engine.log.pages.MAX_PAGE_BYTES, and then
``next_after`` is the position of its last event. A page can therefore be
shorter than the ``limit`` sent while more events follow, and a consumer
has read everything up to the head once ``next_after`` is at least
``head``.
"""

from __future__ import annotations

import json
from typing import Any, Final

import structlog

from engine import log as event_log
from engine.api.dashboard import params
from engine.api.errors import unsupported
from engine.api.http import MAX_INT64, Request, Response, parse_decimal
from engine.api.threads import run_sync
from engine.encoding import replace_non_finite
from engine.log.pages import EventPage, read_after
from engine.registry import Registry

log = structlog.get_logger(__name__)

# Positions are 64-bit integers in the log table.
MAX_POSITION: Final = MAX_INT64
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000

_PARAMETERS: Final = frozenset({"after", "limit", "repository", "type"})

# Positions of events already logged as sent with nulls in place of NaN or
# Infinity. A consumer that replays the log reads them again, and a second
# warning would add nothing. After MAX_WARNED positions, new ones are no
# longer logged.
MAX_WARNED: Final = 1000
_WARNED_POSITIONS: set[Any] = set()


def _count(request: Request, name: str, default: int) -> int:
    value = params.param(request, name)
    if value is None:
        return default
    number = parse_decimal(value)
    if number is None:
        raise unsupported(
            f"{name} must be an integer from 0 to {MAX_POSITION}",
            parameter=name,
            value=value,
        )
    return number


def _limit(request: Request) -> int:
    """Return the page size from ``limit``, capped at MAX_LIMIT, or
    DEFAULT_LIMIT when the request has none."""
    value = params.param(request, "limit")
    if value is None:
        return DEFAULT_LIMIT
    number = parse_decimal(value)
    if number is None or number < 1:
        raise unsupported(
            f"limit must be an integer from 1 to {MAX_INT64}. A page has at "
            f"most {MAX_LIMIT} events, however large the limit",
            parameter="limit",
            value=value,
            max_page_size=MAX_LIMIT,
        )
    return min(number, MAX_LIMIT)


def _encode(event: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(event, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        # Earlier cairn versions stored NaN and Infinity in payloads on
        # SQLite (see engine.projections.rebuild). RFC 8259 JSON has no
        # literal for them, so they are sent as null, as the query API's
        # orjson encoding sends them.
        _warn_non_finite(event)
        finite = replace_non_finite(event)
        text = json.dumps(finite, separators=(",", ":"), default=str, allow_nan=False)
    return text.encode()


def _warn_non_finite(event: dict[str, Any]) -> None:
    """Log, once per position and process, an event sent with nulls."""
    position = event.get("position")
    if position in _WARNED_POSITIONS or len(_WARNED_POSITIONS) >= MAX_WARNED:
        return
    _WARNED_POSITIONS.add(position)
    log.warning(
        "event_payload_not_finite",
        position=position,
        event_id=event.get("id"),
        note="the stored event contains NaN or Infinity, which the feed sends "
        "as null; the event is unchanged in the log",
    )


def _read(
    registry: Registry,
    after: int,
    limit: int,
    repository: str | None,
    types: list[str],
) -> tuple[int, EventPage]:
    with registry.database.read() as conn:
        # The head is read first: every event at or below it is visible to
        # the query that follows, on SQLite and PostgreSQL alike.
        head, _ = event_log.head(conn)
        page = read_after(
            conn, after, limit, _encode, repository=repository, types=types
        )
    return head, page


async def events(request: Request) -> Response:
    # A misspelled parameter, such as ``afer``, would otherwise replay the
    # whole log from position 1.
    params.reject_unknown(request, _PARAMETERS)
    after = _count(request, "after", 0)
    limit = _limit(request)
    repository = params.optional_repository(request)
    types = params.types(request)

    head, page = await run_sync(
        _read, request.state.registry, after, limit, repository, types
    )
    last = page.events[-1].position if page.events else after
    full = page.more or len(page.events) == limit
    next_after = last if full else max(after, head, last)
    # The same bytes as json.dumps of the whole document, built from the
    # events that read_after encoded while it measured the page.
    body = b"".join(
        [
            b'{"events":[',
            b",".join(page.encoded),
            b'],"next_after":%d,"head":%d}' % (next_after, head),
        ]
    )
    return Response(200, [("Content-Type", "application/json")], body)
