"""Handlers of the dashboard API under /_cairn/api/v1/.

Each handler checks its parameters, then runs one function of engine.queries
in a read snapshot through ``consistency.answer``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from engine import queries
from engine.api.dashboard import params
from engine.api.dashboard.consistency import answer
from engine.api.dashboard.openapi import document as openapi_document
from engine.api.errors import unsupported
from engine.api.http import Request, Response, json_response
from engine.domain.events import format_time
from engine.queries.activity import BUCKETS, MAX_TOP, TOP_ORDERS, default_until
from engine.queries.pages import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from engine.queries.repositories import SORTS
from engine.queries.tags import TAG_SORTS

# Without since, an activity series covers this much time before until.
DEFAULT_SPAN = {"hour": timedelta(hours=24), "day": timedelta(days=30)}


def _page_size(request: Request) -> int:
    size = params.integer(
        request, "n", DEFAULT_PAGE_SIZE, minimum=1, maximum=MAX_PAGE_SIZE
    )
    assert size is not None
    return size


class Point:
    """A point in the log, given as ``at`` (a time) or ``position``. A request
    with neither is about the present."""

    def __init__(self, request: Request) -> None:
        self.at = params.time(request, "at")
        self.position = params.integer(request, "position", None)
        if self.at is not None and self.position is not None:
            raise unsupported(
                "pass at or position, not both",
                parameter="at",
                value=request.param("at"),
                position=self.position,
            )

    @property
    def given(self) -> bool:
        return self.at is not None or self.position is not None

    def parameters(self) -> dict[str, Any]:
        """Return ``at`` and ``position`` as the request gave them, for the
        hash of the listing that a cursor carries."""
        return {"at": self.at, "position": self.position}

    def resolve(self, conn: Connection) -> tuple[int, dict[str, Any]]:
        """Return the log position the point names and its JSON description.

        A time maps to the last position at or before it, so a time later
        than the server's clock maps to the log head. Clients' clocks run a
        little ahead or behind, and the dashboard requests the next second.
        A position past the log head raises HTTPError 400 UNSUPPORTED,
        because events still to come would change the answer.
        """
        if self.at is not None:
            position = queries.position_at(conn, self.at)
        else:
            assert self.position is not None
            head = queries.log_head(conn)
            if self.position > head:
                raise unsupported(
                    "position is past the log head, so events still to come "
                    "could change the answer; leave out position to read the "
                    "present",
                    parameter="position",
                    value=self.position,
                    head=head,
                )
            position = self.position
        at = format_time(self.at) if self.at is not None else None
        return position, {"position": position, "at": at}


async def openapi(request: Request) -> Response:
    return json_response(openapi_document())


async def position(request: Request) -> Response:
    def query(conn: Connection) -> dict[str, Any]:
        return {
            "head": queries.log_head(conn),
            "projections": queries.projection_position(conn),
        }

    return await answer(request, query)


async def repositories(request: Request) -> Response:
    sort = params.choice(request, "sort", tuple(SORTS), "name")
    order = params.choice(request, "order", ("asc", "desc"), "asc")
    prefix = params.prefix(request)
    n = _page_size(request)
    cursor = params.cursor(request)

    def query(conn: Connection) -> dict[str, Any]:
        page = queries.repository_page(
            conn,
            sort=sort,
            descending=order == "desc",
            prefix=prefix,
            n=n,
            cursor=cursor,
        )
        return page.to_json("repositories")

    return await answer(request, query)


async def repository(request: Request) -> Response:
    name = params.repository(request)
    return await answer(request, lambda conn: queries.repository(conn, name))


async def catalog(request: Request) -> Response:
    point = Point(request)
    n = _page_size(request)
    cursor = params.cursor(request)

    def query(conn: Connection) -> dict[str, Any]:
        if point.given:
            position, described = point.resolve(conn)
        else:
            position, described = queries.log_head(conn), None
        page = queries.catalog_at(
            conn, position, n=n, cursor=cursor, point=point.parameters()
        )
        return {"point": described, **page.to_json("repositories")}

    return await answer(request, query)


async def tags(request: Request) -> Response:
    name = params.repository(request)
    point = Point(request)
    sort = params.choice(request, "sort", TAG_SORTS, "name")
    n = _page_size(request)
    cursor = params.cursor(request)
    if point.given and sort != "name":
        raise unsupported(
            "tags at a point in time are listed by name only",
            parameter="sort",
            value=sort,
        )

    def query(conn: Connection) -> dict[str, Any]:
        if not point.given:
            page = queries.tag_page(conn, name, sort=sort, n=n, cursor=cursor)
            return {"repository": name, "point": None, **page.to_json("tags")}
        position, described = point.resolve(conn)
        page = queries.tags_at(
            conn, name, position, n=n, cursor=cursor, point=point.parameters()
        )
        return {"repository": name, "point": described, **page.to_json("tags")}

    return await answer(request, query)


async def tag(request: Request) -> Response:
    name = params.repository(request)
    tag_name = params.tag(request)
    point = Point(request)

    def query(conn: Connection) -> dict[str, Any]:
        if not point.given:
            return {
                "repository": name,
                "point": None,
                "tag": queries.tag(conn, name, tag_name),
            }
        position, described = point.resolve(conn)
        entry = queries.tag_at(conn, name, tag_name, position)
        return {"repository": name, "point": described, "tag": entry}

    return await answer(request, query)


async def tag_history(request: Request) -> Response:
    name = params.repository(request)
    tag_name = params.tag(request)
    n = _page_size(request)
    cursor = params.cursor(request)

    def query(conn: Connection) -> dict[str, Any]:
        page = queries.tag_history(conn, name, tag_name, n=n, cursor=cursor)
        return {"repository": name, "tag": tag_name, **page.to_json("history")}

    return await answer(request, query)


async def manifests(request: Request) -> Response:
    name = params.repository(request)
    n = _page_size(request)
    cursor = params.cursor(request)

    def query(conn: Connection) -> dict[str, Any]:
        page = queries.manifest_page(conn, name, n=n, cursor=cursor)
        return {"repository": name, **page.to_json("manifests")}

    return await answer(request, query)


async def referrers(request: Request) -> Response:
    name = params.repository(request)
    n = _page_size(request)
    cursor = params.cursor(request)

    def query(conn: Connection) -> dict[str, Any]:
        page = queries.referrer_page(conn, name, n=n, cursor=cursor)
        return {"repository": name, **page.to_json("referrers")}

    return await answer(request, query)


def _range(request: Request) -> tuple[datetime | None, datetime | None]:
    since = params.time(request, "since")
    until = params.time(request, "until")
    if since is not None and until is not None and until < since:
        raise unsupported(
            "until is before since", parameter="until", value=request.param("until")
        )
    return since, until


async def activity(request: Request) -> Response:
    bucket = params.choice(request, "bucket", tuple(BUCKETS), "hour")
    repository = params.optional_repository(request)
    since, until = _range(request)
    end = until or default_until(since)
    start = since or end - DEFAULT_SPAN[bucket]

    def query(conn: Connection) -> dict[str, Any]:
        return queries.activity(
            conn, since=start, until=end, bucket=bucket, repository=repository
        )

    return await answer(request, query)


async def top(request: Request) -> Response:
    by = params.choice(request, "by", TOP_ORDERS, "size")
    n = params.integer(request, "n", 10, minimum=1, maximum=MAX_TOP)
    assert n is not None
    since, until = _range(request)
    if by == "size":
        # Sizes are the current state, so a time range would be ignored.
        for name in ("since", "until"):
            value = request.param(name)
            if value is not None:
                raise unsupported(
                    f"{name} applies only to by=activity, because by=size ranks "
                    f"by the bytes stored now. Leave {name} out or pass by=activity",
                    parameter=name,
                    value=value,
                )

    def query(conn: Connection) -> dict[str, Any]:
        return queries.top_repositories(conn, by=by, n=n, since=since, until=until)

    return await answer(request, query)


async def events(request: Request) -> Response:
    repository = params.optional_repository(request)
    types = params.types(request)
    actor = params.text(request, "actor")
    address = params.address(request)
    since, until = _range(request)
    n = _page_size(request)
    cursor = params.cursor(request)

    def query(conn: Connection) -> dict[str, Any]:
        page = queries.event_page(
            conn,
            repository=repository,
            types=types,
            actor=actor,
            address=address,
            since=since,
            until=until,
            n=n,
            cursor=cursor,
        )
        return page.to_json("events")

    return await answer(request, query)
