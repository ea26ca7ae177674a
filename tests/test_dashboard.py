"""The dashboard API over HTTP: documents, the Cairn-Position header,
min_position, errors, and the OpenAPI description."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import jsonschema
import pytest

from engine.api.app import RegistryApp, create_app
from engine.api.dashboard.consistency import PositionWaiter
from engine.api.dashboard.openapi import document as openapi_document
from engine.registry import Registry
from tests.images import make_artifact, make_image, make_index
from tests.server import log_position, push_image, running

API = "/_cairn/api/v1"


@pytest.fixture
def app(registry: Registry) -> RegistryApp:
    return create_app(registry)


@pytest.fixture
def api(app: RegistryApp) -> Iterator[httpx.Client]:
    with (
        running(app) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


@pytest.fixture
def pushed(api: httpx.Client) -> dict[str, Any]:
    first = make_image()
    second = make_image()
    push_image(api, "library/app", first, "v1")
    push_image(api, "library/app", second, "v2")
    index = make_index([first, second])
    response = api.put(
        "/v2/library/app/manifests/multi",
        content=index,
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
    )
    assert response.status_code == 201
    push_image(api, "library/app", second, "v1")
    push_image(api, "tools/builder", make_image(), "latest")
    return {"first": str(first.digest), "second": str(second.digest)}


def _validate(path: str, body: Any) -> None:
    """Check ``body`` against the OpenAPI schema of GET ``path``."""
    spec = openapi_document()
    operation = spec["paths"][path]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    resolver_document = {**schema, "components": spec["components"]}
    jsonschema.validate(
        body,
        resolver_document,
        cls=jsonschema.Draft202012Validator,
    )


# ---- documents -----------------------------------------------------------------


def test_every_route_answers(
    api: httpx.Client, registry: Registry, pushed: dict[str, Any]
) -> None:
    cases = {
        "/position": "/position",
        "/repositories": "/repositories?sort=size&order=desc",
        "/repositories/{name}": "/repositories/library/app",
        "/repositories/{name}/-/tags": "/repositories/library/app/-/tags",
        "/repositories/{name}/-/tags/{tag}": "/repositories/library/app/-/tags/v1",
        "/repositories/{name}/-/tags/{tag}/history": (
            "/repositories/library/app/-/tags/v1/history"
        ),
        "/repositories/{name}/-/manifests": "/repositories/library/app/-/manifests",
        "/repositories/{name}/-/referrers": "/repositories/library/app/-/referrers",
        "/catalog": "/catalog?position=3",
        "/activity": "/activity?bucket=day",
        "/top": "/top?by=activity",
        "/events": "/events?type=tag.set&type=manifest.pushed",
    }
    head = log_position(registry)
    for template, path in cases.items():
        response = api.get(API + path)

        assert response.status_code == 200, (path, response.text)
        assert response.headers["Cairn-Position"] == str(head), path
        _validate(template, response.json())


def test_repository_listing_over_http(
    api: httpx.Client, pushed: dict[str, Any]
) -> None:
    first = api.get(f"{API}/repositories", params={"n": 1}).json()
    second = api.get(
        f"{API}/repositories", params={"n": 1, "cursor": first["next_cursor"]}
    ).json()
    prefixed = api.get(f"{API}/repositories", params={"prefix": "tools/"}).json()

    assert first["total"] == 2
    assert [r["name"] for r in first["repositories"]] == ["library/app"]
    assert [r["name"] for r in second["repositories"]] == ["tools/builder"]
    assert second["next_cursor"] is None
    assert [r["name"] for r in prefixed["repositories"]] == ["tools/builder"]


def test_tags_now_and_then(api: httpx.Client, pushed: dict[str, Any]) -> None:
    base = f"{API}/repositories/library/app/-/tags"
    now = api.get(base).json()
    history = api.get(f"{base}/v1/history").json()["history"]
    moved_at = history[0]["from_position"]
    before = api.get(base, params={"position": moved_at - 1}).json()
    then = api.get(f"{base}/v1", params={"at": history[1]["from_time"]}).json()
    lower = api.get(f"{base}/v1", params={"at": history[1]["from_time"].lower()})

    assert {t["tag"]: t["digest"] for t in now["tags"]}["v1"] == pushed["second"]
    multi = {t["tag"]: t for t in now["tags"]}["multi"]
    assert [p["architecture"] for p in multi["platforms"]] == ["arch0", "arch1"]
    assert [h["digest"] for h in history] == [pushed["second"], pushed["first"]]
    assert before["point"] == {"position": moved_at - 1, "at": None}
    assert {t["tag"]: t["digest"] for t in before["tags"]}["v1"] == pushed["first"]
    assert then["tag"]["digest"] == pushed["first"]
    assert then["point"]["position"] < moved_at
    assert lower.status_code == 200, lower.text
    assert lower.json() == then


def test_tag_history_total_over_http(
    api: httpx.Client, registry: Registry, pushed: dict[str, Any]
) -> None:
    path = f"{API}/repositories/library/app/-/tags/v1/history"
    first = api.get(path, params={"n": 1})
    second = api.get(path, params={"n": 1, "cursor": first.json()["next_cursor"]})
    push_image(api, "library/app", make_image(), "v1")
    moved = api.get(path, params={"n": 1})

    assert first.status_code == 200, first.text
    assert len(first.json()["history"]) == 1
    assert first.json()["total"] == 2
    assert second.json()["total"] == 2
    assert second.json()["next_cursor"] is None
    assert moved.json()["total"] == 3
    assert moved.headers["Cairn-Position"] == str(log_position(registry))
    _validate("/repositories/{name}/-/tags/{tag}/history", first.json())


def test_past_tags_show_no_later_end(api: httpx.Client, pushed: dict[str, Any]) -> None:
    base = f"{API}/repositories/library/app/-/tags"
    history = api.get(f"{base}/v1/history").json()["history"]
    replaced = history[1]
    then = {"at": replaced["from_time"]}

    listed = api.get(base, params=then).json()
    document = api.get(f"{base}/v1", params=then).json()

    assert replaced["to_position"] is not None
    assert replaced["ended_by"] is not None
    v1 = {t["tag"]: t for t in listed["tags"]}["v1"]
    for entry in (v1, document["tag"]):
        assert entry["digest"] == pushed["first"]
        assert entry["to_position"] is None
        assert entry["to_time"] is None
        assert entry["ended_by"] is None
    _validate("/repositories/{name}/-/tags", listed)
    _validate("/repositories/{name}/-/tags/{tag}", document)


def test_position_past_head_rejected(api: httpx.Client, pushed: dict[str, Any]) -> None:
    head = api.get(f"{API}/position").json()["head"]

    past_head = api.get(f"{API}/catalog", params={"position": head + 1})

    assert past_head.status_code == 400
    (error,) = past_head.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"] == {"parameter": "position", "value": head + 1, "head": head}
    at_head = api.get(f"{API}/catalog", params={"position": head})
    assert at_head.status_code == 200
    assert len(at_head.json()["repositories"]) == 2


def test_future_time_reads_head(api: httpx.Client, pushed: dict[str, Any]) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    response = api.get(f"{API}/catalog", params={"at": tomorrow})

    assert response.status_code == 200, response.text
    assert response.json()["point"]["position"] == int(
        response.headers["Cairn-Position"]
    )
    assert len(response.json()["repositories"]) == 2


def test_time_ranges_widen_to_whole_hours(
    api: httpx.Client, pushed: dict[str, Any]
) -> None:
    pushed_at = datetime.fromisoformat(
        api.get(f"{API}/events", params={"n": 1}).json()["events"][0]["time"]
    )
    # Both ends lie in the hour of ``since``, whatever the clock shows.
    since_time = pushed_at + timedelta(microseconds=1)
    hour = since_time.replace(minute=0, second=0, microsecond=0)
    since = since_time.isoformat()
    until = max(since_time, hour + timedelta(minutes=59)).isoformat()

    top = api.get(f"{API}/top", params={"by": "activity", "since": since})
    series = api.get(f"{API}/activity", params={"since": since, "until": until})

    assert top.status_code == 200, top.text
    assert top.json()["since"] == hour.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert {r["name"] for r in top.json()["repositories"]} == {
        "library/app",
        "tools/builder",
    }
    assert series.status_code == 200, series.text
    assert [b["start"] for b in series.json()["buckets"]] == [top.json()["since"]]
    assert series.json()["until"] == (hour + timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    assert series.json()["totals"]["pushes"] > 0


@pytest.mark.parametrize(
    ("path", "params"), [("/activity", {}), ("/top", {"by": "activity"})]
)
def test_future_since_reads_its_hour(
    api: httpx.Client, pushed: dict[str, Any], path: str, params: dict[str, str]
) -> None:
    # Two days ahead of the server's clock, as from a client's fast clock.
    since_time = datetime.now(UTC) + timedelta(days=2)
    hour = since_time.replace(minute=0, second=0, microsecond=0)

    response = api.get(API + path, params={**params, "since": since_time.isoformat()})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["since"] == hour.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert body["until"] == (hour + timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    if path == "/activity":
        assert [b["start"] for b in body["buckets"]] == [body["since"]]
        assert body["totals"]["events"] == 0
    else:
        assert body["repositories"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/repositories/library/nothing",
        "/repositories/library/nothing/-/tags",
        "/repositories/library/app/-/tags/v9",
        "/repositories/library/app/-/tags/v9?position=2",
        "/repositories/library/app/-/tags/v9/history",
    ],
)
def test_not_found_has_position(
    api: httpx.Client, pushed: dict[str, Any], path: str
) -> None:
    head = api.get(f"{API}/position").json()["head"]

    response = api.get(API + path)

    assert response.status_code == 404, response.text
    assert response.headers["Cairn-Position"] == str(head)


def test_not_found_documents_position() -> None:
    operations = [path["get"] for path in openapi_document()["paths"].values()]
    not_found = [
        op["responses"]["404"] for op in operations if "404" in op["responses"]
    ]

    assert len(not_found) >= 5
    for response in not_found:
        assert "Cairn-Position" in response["headers"]


def test_slashes_may_be_encoded(api: httpx.Client, pushed: dict[str, Any]) -> None:
    response = api.get(f"{API}/repositories/library%2Fapp/-/tags/v2")

    assert response.status_code == 200
    assert response.json()["tag"]["digest"] == pushed["second"]


# ---- min_position ------------------------------------------------------------------


def test_min_position_waits_for_push(
    api: httpx.Client, app: RegistryApp, registry: Registry, pushed: dict[str, Any]
) -> None:
    head = log_position(registry)
    results: list[httpx.Response] = []

    def read_after_push() -> None:
        results.append(
            api.get(
                f"{API}/repositories/tools/builder/-/tags",
                params={"min_position": head + 1},
            )
        )

    waiter = app.state.position_waiter
    assert waiter is not None
    reader = threading.Thread(target=read_after_push)
    reader.start()
    # Push only once the request is waiting, so the test sees it woken.
    deadline = time.monotonic() + 30
    while waiter.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waiter.waiting == 1
    registry.repository("tools/builder").tags.tag("v9", make_pushed_digest(registry))
    reader.join(timeout=30)

    assert len(results) == 1
    response = results[0]
    assert int(response.headers["Cairn-Position"]) >= head + 1
    assert "v9" in [t["tag"] for t in response.json()["tags"]]


def make_pushed_digest(registry: Registry) -> Any:
    """Return the digest that tools/builder:latest points to."""
    return registry.repository("tools/builder").tags.get("latest").digest


def test_min_position_gives_up(app: RegistryApp, registry: Registry) -> None:
    app.state.position_waiter = PositionWaiter(registry.database, max_wait=0.2)
    with (
        running(app) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        push_image(client, "app", make_image(), "v1")
        response = client.get(f"{API}/position", params={"min_position": 10**9})

    assert response.status_code == 200
    assert response.headers["Cairn-Position"] == str(log_position(registry))
    assert response.json()["head"] == log_position(registry)


# ---- errors ----------------------------------------------------------------------


BAD_REQUESTS = [
    ("/repositories?n=0", "n", "0"),
    ("/repositories?n=1001", "n", "1001"),
    ("/repositories?n=ten", "n", "ten"),
    ("/repositories?sort=colour", "sort", "colour"),
    ("/repositories?order=up", "order", "up"),
    ("/repositories?prefix=UPPER", "prefix", "UPPER"),
    ("/repositories?cursor=!!", "cursor", "!!"),
    ("/repositories?min_position=-1", "min_position", "-1"),
    ("/catalog?at=yesterday", "at", "yesterday"),
    ("/catalog?at=2026-01-01T00:00:00", "at", "2026-01-01T00:00:00"),
    # ISO 8601 forms that are not RFC 3339 date-times.
    ("/catalog?at=20260101T000000Z", "at", "20260101T000000Z"),
    ("/catalog?at=2026-W01-1T00:00:00Z", "at", "2026-W01-1T00:00:00Z"),
    ("/catalog?at=2026-01-01T00:00Z", "at", "2026-01-01T00:00Z"),
    ("/catalog?at=2026-01-01T00Z", "at", "2026-01-01T00Z"),
    ("/catalog?at=2026-01-01", "at", "2026-01-01"),
    ("/catalog?at=2026-01-01T00:00:00%2B0100", "at", "2026-01-01T00:00:00+0100"),
    ("/catalog?at=2026-01-01T00:00:00,5Z", "at", "2026-01-01T00:00:00,5Z"),
    ("/catalog?position=99999999999999999999", "position", "99999999999999999999"),
    # Instants outside 1970 to 9998 in UTC, whatever year the offset shows.
    ("/catalog?at=0001-01-01T00:00:00Z", "at", "0001-01-01T00:00:00Z"),
    ("/catalog?at=1970-01-01T00:00:00%2B05:00", "at", "1970-01-01T00:00:00+05:00"),
    ("/catalog?at=9998-12-31T23:59:59-05:00", "at", "9998-12-31T23:59:59-05:00"),
    ("/catalog?at=9999-01-01T00:00:00Z", "at", "9999-01-01T00:00:00Z"),
    ("/catalog?at=2026-01-01T00:00:00Z&position=3", "at", "2026-01-01T00:00:00Z"),
    ("/activity?bucket=week", "bucket", "week"),
    ("/activity?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", "until", None),
    ("/top?by=colour", "by", "colour"),
    ("/top?n=101", "n", "101"),
    # Sizes are the current state, so by=size takes no time range.
    ("/top?since=2026-01-01T00:00:00Z", "since", "2026-01-01T00:00:00Z"),
    ("/top?by=size&until=2026-01-01T00:00:00Z", "until", "2026-01-01T00:00:00Z"),
    ("/events?type=blob.eaten", "type", "blob.eaten"),
    ("/events?actor=%07bell", "actor", "\x07bell"),
    ("/events?address=localhost", "address", "localhost"),
    ("/events?address=127.0.0.1:5000", "address", "127.0.0.1:5000"),
    ("/events?address=10.0.0.0/8", "address", "10.0.0.0/8"),
    ("/events?address=[::1]", "address", "[::1]"),
    ("/events?address=127.0.0.01", "address", "127.0.0.01"),
    ("/repositories/library/app/-/tags?position=3&sort=recent", "sort", "recent"),
]


@pytest.mark.parametrize(("path", "parameter", "value"), BAD_REQUESTS)
def test_bad_parameters_get_400(
    api: httpx.Client, path: str, parameter: str, value: str | None
) -> None:
    push_image(api, "library/app", make_image(), "v1")

    response = api.get(API + path)

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"]
    assert error["detail"]["parameter"] == parameter
    if value is not None:
        assert error["detail"]["value"] == value


@pytest.mark.parametrize(
    ("path", "parameter", "value", "key"),
    [
        ("/catalog", "at", "1970-01-01T00:00:00Z", "repositories"),
        ("/catalog", "at", "1970-01-01T05:00:00+05:00", "repositories"),
        # at cannot be later than the present, so the last second of the
        # range is tried on a time range.
        ("/events", "until", "9998-12-31T23:59:59Z", "events"),
    ],
)
def test_time_range_edges_accepted(
    api: httpx.Client, path: str, parameter: str, value: str, key: str
) -> None:
    response = api.get(f"{API}{path}", params={parameter: value})

    assert response.status_code == 200, response.text
    assert response.json()[key] == []


@pytest.mark.parametrize("path", ["/_cairn/events", f"{API}/events"])
def test_unknown_type_lists_families(api: httpx.Client, path: str) -> None:
    response = api.get(path, params={"type": "tag.set,tags"})

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert "'tags'" in error["message"]
    assert error["detail"]["parameter"] == "type"
    assert error["detail"]["value"] == "tags"
    assert "tag" in error["detail"]["supported"]
    assert "tag.set" in error["detail"]["supported"]


def test_events_filter_by_address(api: httpx.Client) -> None:
    push_image(api, "library/app", make_image(), "v1")

    local = api.get(f"{API}/events", params={"address": "127.0.0.1"})
    other = api.get(f"{API}/events", params={"address": "::1"})

    assert local.status_code == 200, local.text
    assert local.json()["events"]
    for event in local.json()["events"]:
        assert event["actor"]["address"] == "127.0.0.1"
    assert other.status_code == 200, other.text
    assert other.json()["events"] == []


@pytest.fixture
def two_repositories(api: httpx.Client) -> None:
    """Push to library/app and library/other enough for two pages of every
    listing: two images each, tag v1 moved once, and two referrers each."""
    for repository in ("library/app", "library/other"):
        first, second = make_image(), make_image()
        push_image(api, repository, first, "v1")
        push_image(api, repository, second, "v2")
        push_image(api, repository, second, "v1")
        for number in range(2):
            artifact = make_artifact(first, SBOM, f"sbom {number}".encode())
            push_image(api, repository, artifact)


SBOM = "application/spdx+json"
APP = "/repositories/library/app"
OTHER = "/repositories/library/other"

# A listing that returns a cursor, and another listing that must reject it.
CURSOR_ELSEWHERE = [
    pytest.param(f"{APP}/-/manifests", f"{OTHER}/-/manifests", id="manifests-repo"),
    pytest.param(f"{APP}/-/referrers", f"{OTHER}/-/referrers", id="referrers-repo"),
    pytest.param(f"{APP}/-/manifests", f"{APP}/-/referrers", id="manifests-referrers"),
    pytest.param(f"{APP}/-/tags", f"{OTHER}/-/tags", id="tags-repo"),
    pytest.param(f"{APP}/-/tags", f"{OTHER}/-/tags?position=5", id="tags-at-repo"),
    pytest.param(
        f"{APP}/-/tags?sort=recent", f"{APP}/-/tags?sort=name", id="tags-sort"
    ),
    pytest.param(
        f"{APP}/-/tags/v1/history", f"{APP}/-/tags/v2/history", id="history-tag"
    ),
    pytest.param(
        f"{APP}/-/tags/v1/history", f"{OTHER}/-/tags/v1/history", id="history-repo"
    ),
    pytest.param(
        "/repositories?prefix=library/",
        "/repositories?prefix=library/o",
        id="repositories-prefix",
    ),
    pytest.param("/repositories", "/repositories?order=desc", id="repositories-order"),
    pytest.param(
        "/repositories?sort=size", "/repositories?sort=tags", id="repositories-sort"
    ),
    pytest.param("/catalog", f"{APP}/-/tags", id="catalog-tags"),
    # A cursor carries the point (at or position) of its listing, so it
    # continues only a listing at the same point.
    pytest.param(
        f"{APP}/-/tags?position=HEAD",
        f"{APP}/-/tags?position=BEFORE_HEAD",
        id="tags-position",
    ),
    pytest.param(f"{APP}/-/tags", f"{APP}/-/tags?position=HEAD", id="tags-point"),
    pytest.param(
        f"{APP}/-/tags?position=HEAD",
        f"{APP}/-/tags?at=NOW",
        id="tags-position-at",
    ),
    pytest.param(
        "/catalog?position=HEAD", "/catalog?position=BEFORE_HEAD", id="catalog-position"
    ),
    pytest.param(
        "/catalog?at=NOW", "/catalog?at=2000-01-01T00:00:00Z", id="catalog-at"
    ),
    pytest.param("/catalog", "/catalog?position=HEAD", id="catalog-point"),
    pytest.param(
        "/events?repository=library/app",
        "/events?repository=library/other",
        id="events-repo",
    ),
    pytest.param("/events?repository=library/app", "/events", id="events-unfiltered"),
    pytest.param(
        "/events?type=manifest.pushed", "/events?type=tag.set", id="events-type"
    ),
    pytest.param(
        "/events?since=2000-01-01T00:00:00Z",
        "/events?since=2000-01-01T00:00:01Z",
        id="events-since",
    ),
    pytest.param("/events", f"{APP}/-/manifests", id="events-manifests"),
]


def _get_with(api: httpx.Client, path: str, **params: str | int) -> httpx.Response:
    """GET ``path`` with ``params`` added to the query that it contains.

    httpx replaces the query of a URL with ``params`` instead of adding to it.
    """
    return api.get(httpx.URL(API + path).copy_merge_params(params))


def _at_present(api: httpx.Client, *paths: str) -> list[str]:
    """Fill in the log head (HEAD, and BEFORE_HEAD for the position before
    it) and the present time (NOW, and NOW_PLUS_ONE for the same instant
    written with the offset +01:00) in ``paths``."""
    head = api.get(f"{API}/position").json()["head"]
    now = datetime.now(UTC)
    offset = now.astimezone(timezone(timedelta(hours=1)))
    values = {
        "BEFORE_HEAD": str(head - 1),
        "HEAD": str(head),
        "NOW_PLUS_ONE": offset.isoformat().replace("+", "%2B"),
        "NOW": now.isoformat().replace("+00:00", "Z"),
    }
    filled = []
    for path in paths:
        for placeholder, value in values.items():
            path = path.replace(placeholder, value)
        filled.append(path)
    return filled


def _first_cursor(api: httpx.Client, path: str) -> str:
    response = _get_with(api, path, n=1)
    assert response.status_code == 200, response.text
    cursor = response.json()["next_cursor"]
    assert cursor is not None, path
    return str(cursor)


@pytest.mark.parametrize(("source", "target"), CURSOR_ELSEWHERE)
def test_cursor_of_other_listing_rejected(
    api: httpx.Client, two_repositories: None, source: str, target: str
) -> None:
    source, target = _at_present(api, source, target)
    cursor = _first_cursor(api, source)
    # The cursor continues the listing it came from.
    own = _get_with(api, source, n=1, cursor=cursor)
    assert own.status_code == 200, own.text

    response = _get_with(api, target, n=1, cursor=cursor)

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    # A cursor whose sort key has another type, such as a position where a
    # tag name belongs, is invalid before it is compared with the listing.
    assert error["message"].startswith(
        ("the cursor belongs to another listing", "invalid cursor")
    )
    assert error["detail"] == {"parameter": "cursor", "value": cursor}


# A listing that returns a cursor, and a request for the same listing that
# must accept it.
CURSOR_SAME_LISTING = [
    pytest.param(
        "/events?since=2000-01-01T00:00:00Z",
        "/events?since=2000-01-01T01:00:00%2B01:00",
        id="same-instant",
    ),
    pytest.param(
        "/events?type=tag.set,manifest.pushed",
        "/events?type=manifest.pushed&type=tag.set&type=tag.set",
        id="same-types",
    ),
    pytest.param(
        f"{APP}/-/tags?position=HEAD",
        f"{APP}/-/tags?position=HEAD",
        id="tags-same-position",
    ),
    pytest.param(
        "/catalog?at=NOW", "/catalog?at=NOW_PLUS_ONE", id="catalog-same-instant"
    ),
]


@pytest.mark.parametrize(("source", "target"), CURSOR_SAME_LISTING)
def test_cursor_of_same_listing_accepted(
    api: httpx.Client, two_repositories: None, source: str, target: str
) -> None:
    source, target = _at_present(api, source, target)
    cursor = _first_cursor(api, source)

    response = _get_with(api, target, n=2, cursor=cursor)

    assert response.status_code == 200, response.text


# Every route without a past view, with the path that reaches it.
WITHOUT_PAST_VIEW = {
    "/position": "/position",
    "/repositories": "/repositories",
    "/repositories/{name}": "/repositories/library/app",
    "/repositories/{name}/-/tags/{tag}/history": (
        "/repositories/library/app/-/tags/v1/history"
    ),
    "/repositories/{name}/-/manifests": "/repositories/library/app/-/manifests",
    "/repositories/{name}/-/referrers": "/repositories/library/app/-/referrers",
    "/activity": "/activity",
    "/top": "/top",
    "/events": "/events",
}


@pytest.mark.parametrize("parameter", ["position", "at"])
@pytest.mark.parametrize("template", list(WITHOUT_PAST_VIEW))
def test_point_without_past_view_rejected(
    api: httpx.Client, template: str, parameter: str
) -> None:
    push_image(api, "library/app", make_image(), "v1")
    value = "1" if parameter == "position" else "2026-01-01T00:00:00Z"

    response = api.get(API + WITHOUT_PAST_VIEW[template], params={parameter: value})

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"].startswith(f"{parameter} is not supported here")
    assert error["detail"]["parameter"] == parameter
    assert error["detail"]["value"] == value
    assert parameter not in error["detail"]["supported"]


def test_past_views_take_point(api: httpx.Client) -> None:
    push_image(api, "library/app", make_image(), "v1")
    paths = [
        "/catalog",
        "/repositories/library/app/-/tags",
        "/repositories/library/app/-/tags/v1",
    ]

    head = api.get(f"{API}/position").json()["head"]

    for path in paths:
        now = datetime.now(UTC).isoformat()
        for parameter, value in (("position", str(head)), ("at", now)):
            response = api.get(API + path, params={parameter: value})

            assert response.status_code == 200, (path, response.text)
            assert response.json()["point"] is not None, path


@pytest.mark.parametrize(
    ("path", "parameter", "supported"),
    [
        ("/repositories?sotr=size", "sotr", "sort"),
        ("/catalog?sort=name", "sort", "position"),
        ("/top?cursor=abc", "cursor", "by"),
        ("/activity?n=5", "n", "bucket"),
        ("/repositories/library/app/-/tags?order=desc", "order", "sort"),
        ("/repositories/library/app?prefix=lib", "prefix", "min_position"),
    ],
)
def test_unknown_parameter_rejected(
    api: httpx.Client, path: str, parameter: str, supported: str
) -> None:
    push_image(api, "library/app", make_image(), "v1")

    response = api.get(API + path)

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"].startswith(f"unknown query parameter {parameter}.")
    assert error["detail"]["parameter"] == parameter
    assert supported in error["detail"]["supported"]
    assert supported in error["message"]


@pytest.mark.parametrize(
    ("path", "name", "values"),
    [
        ("/events?repository=a/b&repository=c/d", "repository", ["a/b", "c/d"]),
        ("/repositories?sort=size&sort=name", "sort", ["size", "name"]),
    ],
)
def test_repeated_parameter_rejected(
    api: httpx.Client, path: str, name: str, values: list[str]
) -> None:
    response = api.get(API + path)

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert "may be given once" in error["message"]
    assert error["detail"]["parameter"] == name
    assert error["detail"]["values"] == values


def test_openapi_document_takes_no_parameters(api: httpx.Client) -> None:
    response = api.get(f"{API}/openapi.json", params={"format": "yaml"})

    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["detail"]["parameter"] == "format"
    assert error["detail"]["supported"] == []
    assert "takes no query parameters" in error["message"]


def test_unknown_and_invalid_names(api: httpx.Client) -> None:
    push_image(api, "library/app", make_image(), "v1")

    unknown = api.get(f"{API}/repositories/library/none")
    invalid = api.get(f"{API}/repositories/Library/App/-/tags")
    no_tag = api.get(f"{API}/repositories/library/app/-/tags/v9")
    bad_tag = api.get(f"{API}/repositories/library/app/-/tags/-v1/history")
    early = api.get(f"{API}/repositories/library/app/-/tags/v1", params={"position": 1})
    no_route = api.get(f"{API}/repositories/library/app/-/nope")
    dash_only = api.get(f"{API}/repositories/library/app/-")

    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    assert invalid.status_code == 400
    assert invalid.json()["errors"][0]["code"] == "NAME_INVALID"
    assert no_tag.status_code == 404
    assert no_tag.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert bad_tag.status_code == 400
    assert early.status_code == 404
    assert early.json()["errors"][0]["detail"]["position"] == 1
    assert no_route.status_code == 404
    assert no_route.json()["errors"][0]["code"] != "NAME_INVALID"
    assert dash_only.status_code == 404


def test_openapi_document_served(api: httpx.Client) -> None:
    response = api.get(f"{API}/openapi.json")

    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert document == openapi_document()
    assert "/repositories/{name}/-/tags/{tag}/history" in document["paths"]


def test_ui_without_slash_redirects(api: httpx.Client) -> None:
    response = api.get("/_cairn/ui?tab=tags")

    assert response.status_code == 308
    assert response.headers["Location"] == "/_cairn/ui/?tab=tags"


def test_ui_redirect_ignores_forwarded_host(api: httpx.Client) -> None:
    response = api.get(
        "/_cairn/ui",
        headers={"X-Forwarded-Host": "elsewhere.test", "X-Forwarded-Proto": "https"},
    )

    assert response.status_code == 308
    assert response.headers["Location"] == "/_cairn/ui/"


def test_ui_assets_resolve_after_redirect(api: httpx.Client) -> None:
    page = api.get("/_cairn/ui", follow_redirects=True)

    assert page.status_code == 200
    assert page.url.path == "/_cairn/ui/"
    for asset in ("style.css", "app.js"):
        assert f'"{asset}"' in page.text
        assert api.get(page.url.join(asset)).status_code == 200
