"""Byte-bounded pages of both event feeds: /_cairn/events in log order and
the query API's /_cairn/api/v1/events newest first."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog

from engine import log as event_log
from engine.api import feed
from engine.api.app import create_app
from engine.domain.events import Actor, EventType, NewEvent
from engine.encoding import encode_json
from engine.log import pages
from engine.migrate import upgrade
from engine.registry import Registry
from tests.images import make_image
from tests.server import push_blob, push_image, running

# Far below the real budget, so that a page of the events below passes it.
BUDGET = 100_000
# Each manifest.pushed event carries an annotation of this many characters.
ANNOTATION_CHARS = 30_000


@pytest.fixture
def api(registry: Registry) -> Iterator[httpx.Client]:
    with (
        running(create_app(registry)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


@pytest.fixture
def annotated(api: httpx.Client) -> None:
    """Push large manifests to library/big between small blobs elsewhere."""
    for i in range(8):
        annotation = os.urandom(ANNOTATION_CHARS // 2).hex()
        image = make_image(layer_size=64, annotations={"big": annotation})
        push_image(api, "library/big", image, f"v{i}")
        push_blob(api, "library/small", f"small {i}".encode())


@pytest.fixture
def accented(api: httpx.Client) -> None:
    """Push manifests with a non-ASCII annotation. /_cairn/events escapes
    each of its characters in six bytes, where PostgreSQL stores two."""
    for i in range(6):
        image = make_image(layer_size=64, annotations={"big": "\u00e9" * 20_000})
        push_image(api, "library/accented", image, f"v{i}")


def _logged(registry: Registry, **filters: Any) -> list[dict[str, Any]]:
    """Return every event that matches ``filters``, in log order."""
    with registry.database.read() as conn:
        return [event.to_json() for event in event_log.read_all(conn, **filters)]


def _feed_size(event: dict[str, Any]) -> int:
    """Return the size of ``event`` as /_cairn/events encodes it."""
    return len(json.dumps(event, separators=(",", ":")).encode())


def _read_feed(api: httpx.Client, params: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Return the pages read by following next_after from 0 to the head."""
    pages_read: list[list[dict[str, Any]]] = []
    after = 0
    while True:
        response = api.get("/_cairn/events", params={**params, "after": after})
        assert response.status_code == 200, response.text
        page = response.json()
        pages_read.append(page["events"])
        assert page["next_after"] >= after
        after = page["next_after"]
        if after >= page["head"]:
            return pages_read


def _read_query_api(
    api: httpx.Client, params: dict[str, Any]
) -> list[list[dict[str, Any]]]:
    """Return the pages read by following next_cursor until it is null."""
    pages_read: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = api.get("/_cairn/api/v1/events", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        pages_read.append(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages_read


# ---- /_cairn/events ------------------------------------------------------------


@pytest.mark.usefixtures("annotated")
def test_feed_page_stops_at_budget(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", BUDGET)

    response = api.get("/_cairn/events", params={"limit": 1000})

    assert response.status_code == 200
    page = response.json()
    sizes = [_feed_size(event) for event in page["events"]]
    # Events are added while the page is below the budget, and no longer.
    assert sum(sizes[:-1]) < BUDGET
    assert sum(sizes) >= BUDGET
    assert len(response.content) < BUDGET + max(sizes) + 100
    assert page["next_after"] == page["events"][-1]["position"]
    assert page["next_after"] < page["head"]


@pytest.mark.usefixtures("annotated")
def test_feed_event_over_budget_alone(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", 1)
    first = api.get("/_cairn/events", params={"type": "manifest.pushed"}).json()

    second = api.get(
        "/_cairn/events",
        params={"type": "manifest.pushed", "after": first["next_after"]},
    ).json()

    assert len(first["events"]) == 1
    assert len(second["events"]) == 1
    assert first["next_after"] == first["events"][0]["position"]
    assert second["events"][0]["position"] > first["next_after"]


@pytest.mark.usefixtures("annotated")
@pytest.mark.parametrize("budget", [1, BUDGET])
@pytest.mark.parametrize(
    ("params", "filters"),
    [
        ({}, {}),
        (
            {"type": "manifest.pushed,blob.pushed"},
            {"types": ["manifest.pushed", "blob.pushed"]},
        ),
        ({"repository": "library/big"}, {"repository": "library/big"}),
    ],
    ids=["all", "types", "repository"],
)
def test_feed_pages_every_event_once(
    api: httpx.Client,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
    params: dict[str, Any],
    filters: dict[str, Any],
) -> None:
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", budget)

    pages_read = _read_feed(api, {**params, "limit": 1000})

    expected = _logged(registry, **filters)
    assert [event for page in pages_read for event in page] == expected
    assert len(pages_read) > 2
    assert all(pages_read[:-1])


# ---- /_cairn/api/v1/events -----------------------------------------------------


@pytest.mark.usefixtures("annotated")
def test_query_api_page_stops_at_budget(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", BUDGET)

    response = api.get("/_cairn/api/v1/events", params={"n": 1000})

    assert response.status_code == 200
    page = response.json()
    sizes = [len(encode_json(event)) for event in page["events"]]
    assert sum(sizes[:-1]) < BUDGET
    assert sum(sizes) >= BUDGET
    assert len(response.content) < BUDGET + max(sizes) + 100
    assert page["next_cursor"] is not None


@pytest.mark.usefixtures("annotated")
@pytest.mark.parametrize("budget", [1, BUDGET])
@pytest.mark.parametrize(
    ("params", "filters"),
    [
        ({}, {}),
        (
            {"type": "manifest.pushed,blob.pushed"},
            {"types": ["manifest.pushed", "blob.pushed"]},
        ),
        ({"repository": "library/big"}, {"repository": "library/big"}),
    ],
    ids=["all", "types", "repository"],
)
def test_query_api_pages_every_event_once(
    api: httpx.Client,
    registry: Registry,
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
    params: dict[str, Any],
    filters: dict[str, Any],
) -> None:
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", budget)

    pages_read = _read_query_api(api, {**params, "n": 1000})

    expected = _logged(registry, **filters)[::-1]
    assert [event for page in pages_read for event in page] == expected
    assert len(pages_read) > 2
    assert all(pages_read)


# ---- both ----------------------------------------------------------------------


@pytest.mark.usefixtures("accented")
def test_non_ascii_pages_every_event_once(
    api: httpx.Client, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", BUDGET)

    feed = _read_feed(api, {"limit": 1000})
    query_api = _read_query_api(api, {"n": 1000})

    expected = _logged(registry)
    assert [event for page in feed for event in page] == expected
    assert [event for page in query_api for event in page] == expected[::-1]
    for page in feed:
        sizes = [_feed_size(event) for event in page]
        assert sum(sizes[:-1]) < BUDGET
    for page in query_api:
        sizes = [len(encode_json(event)) for event in page]
        assert sum(sizes[:-1]) < BUDGET
    assert len(feed) > 2
    assert len(query_api) > 2


# ---- payloads with NaN and Infinity --------------------------------------------


def _strict_json(text: str) -> Any:
    """Parse ``text`` as RFC 8259 JSON, which has no NaN or Infinity."""

    def reject(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=reject)


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry on SQLite, which stores a NaN literal in a payload as it is.

    PostgreSQL's jsonb rejects such text, so the case exists only on SQLite.
    """
    data_dir = tmp_path / "sqlite-data"
    data_dir.mkdir()
    registry = Registry.open(data_dir, f"sqlite:///{tmp_path / 'nan.db'}")
    upgrade(registry.database)
    yield registry
    registry.database.dispose()


NON_FINITE_PAYLOAD = (
    '{"digest": "sha256:' + "a" * 64 + '", "size": NaN, '
    '"platforms": [{"os.version": Infinity, "variant": -Infinity}]}'
)


@pytest.mark.parametrize("path", ["/_cairn/events", "/_cairn/api/v1/events"])
def test_non_finite_payload_sent_as_null(
    path: str, sqlite_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The feed logs each position once per process, so earlier tests must
    # not have used up the warning for position 1.
    monkeypatch.setattr(feed, "_WARNED_POSITIONS", set())
    with sqlite_registry.database.write() as conn:
        event_log.append(
            conn,
            [
                NewEvent(
                    type=EventType.BLOB_PUSHED,
                    repository="library/legacy",
                    payload={"digest": "sha256:" + "a" * 64, "size": 3},
                )
            ],
            actor=Actor("alice", "127.0.0.1"),
        )
        # Written as earlier cairn versions could store it, which json.loads
        # reads but RFC 8259 JSON cannot represent.
        conn.execute(
            sa.text("UPDATE events SET payload = :payload WHERE position = 1"),
            {"payload": NON_FINITE_PAYLOAD},
        )

    with (
        running(create_app(sqlite_registry)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
        structlog.testing.capture_logs() as logged,
    ):
        response = client.get(path)

    assert response.status_code == 200, response.text
    (event,) = _strict_json(response.text)["events"]
    assert event["position"] == 1
    assert event["payload"]["size"] is None
    assert event["payload"]["platforms"] == [{"os.version": None, "variant": None}]
    assert event["payload"]["digest"] == "sha256:" + "a" * 64
    if path == "/_cairn/events":
        warnings = [e for e in logged if e["event"] == "event_payload_not_finite"]
        assert [warning["position"] for warning in warnings] == [1]


def test_encode_json_fallback_non_finite() -> None:
    # A lone surrogate makes orjson fail, so json.dumps encodes the document.
    document = {"text": "\ud800", "size": float("nan"), "list": [float("inf")]}

    decoded = _strict_json(encode_json(document).decode())

    assert decoded == {"text": "\ud800", "size": None, "list": [None]}
