"""cairn's own endpoints: /_cairn/health and the /_cairn/events feed."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.api.app import create_app
from engine.api.feed import MAX_LIMIT
from engine.api.http import MAX_INT64
from engine.bus import Bus
from engine.cli import build_parser
from engine.registry import Registry
from tests.images import make_image
from tests.server import push_blob, push_image, running


@pytest.fixture
def api(registry: Registry) -> Iterator[httpx.Client]:
    with (
        running(create_app(registry)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


def _serve_args(data_dir: Path) -> argparse.Namespace:
    return build_parser().parse_args(
        ["serve", "--data-dir", str(data_dir), "--no-nats"]
    )


# ---- health --------------------------------------------------------------------


def test_health_without_bus(api: httpx.Client, registry: Registry) -> None:
    push_blob(api, "library/app", b"one event")

    response = api.get("/_cairn/health")

    assert response.status_code == 200
    document = response.json()
    assert document["status"] == "ok"
    assert document["database"]["status"] == "ok"
    assert document["database"]["backend"] == registry.database.dialect
    assert document["database"]["log_position"] == 1
    assert document["blobs"]["status"] == "ok"
    assert document["blobs"]["free_bytes"] > 0
    assert document["bus"] == {"state": "disabled"}


def test_health_reports_bus(registry: Registry, data_dir: Path) -> None:
    bus = Bus.from_args(_serve_args(data_dir), registry.database, data_dir)
    with (
        running(create_app(registry, bus)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        response = client.get("/_cairn/health")

    assert response.status_code == 200
    assert response.json()["bus"] == bus.health()
    assert response.json()["bus"]["state"] == "disabled"


def test_health_fails_without_blob_storage(
    api: httpx.Client, registry: Registry
) -> None:
    staging = registry.blob_store.paths.staging_dir
    staging.rmdir()
    try:
        response = api.get("/_cairn/health")
    finally:
        staging.mkdir()

    assert response.status_code == 503
    document = response.json()
    assert document["status"] == "error"
    assert document["blobs"]["status"] == "error"
    assert str(staging) in document["blobs"]["error"]
    assert document["database"]["status"] == "ok"


def test_manifest_get_notifies_bus(registry: Registry, data_dir: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.pulls: list[tuple[str, str, str, str | None]] = []

        def health(self) -> dict[str, object]:
            return {"state": "recording"}

        def notify_pull(self, repository, reference, digest, actor, request_id):  # type: ignore[no-untyped-def]
            self.pulls.append((repository, reference, digest, actor.address))

    recorder = Recorder()
    image = make_image()
    with (
        running(create_app(registry, recorder)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        push_image(client, "library/app", image, "v1")
        client.get("/v2/library/app/manifests/v1")
        client.head("/v2/library/app/manifests/v1")
        client.get("/v2/library/app/manifests/v2")

    assert recorder.pulls == [
        ("library/app", "v1", str(image.digest), "127.0.0.1"),
    ]


# ---- events --------------------------------------------------------------------


def test_events_page_through_log(api: httpx.Client) -> None:
    for i in range(5):
        push_blob(api, f"library/repo{i % 2}", f"blob {i}".encode())

    first = api.get("/_cairn/events", params={"limit": 2}).json()
    second = api.get(
        "/_cairn/events", params={"after": first["next_after"], "limit": 2}
    ).json()
    third = api.get(
        "/_cairn/events", params={"after": second["next_after"], "limit": 2}
    ).json()
    caught_up = api.get("/_cairn/events", params={"after": third["next_after"]}).json()

    positions = [
        e["position"] for page in (first, second, third) for e in page["events"]
    ]
    assert positions == [1, 2, 3, 4, 5]
    assert first["next_after"] == 2
    assert third["next_after"] == 5
    assert first["head"] == 5
    assert caught_up == {"events": [], "next_after": 5, "head": 5}


def test_events_carry_the_stored_envelope(api: httpx.Client) -> None:
    digest = push_blob(api, "library/app", b"enveloped")

    event = api.get("/_cairn/events").json()["events"][0]

    assert event["type"] == "blob.pushed"
    assert event["repository"] == "library/app"
    assert event["version"] == 1
    assert event["payload"] == {"digest": str(digest), "size": 9}
    assert event["previous_hash"] == "0" * 64
    assert len(event["hash"]) == 64
    assert event["id"]
    assert event["time"].endswith("Z")


def test_events_filters(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    push_blob(api, "library/other", b"elsewhere")

    tags = api.get("/_cairn/events", params={"type": "tag.set"}).json()
    both = api.get(
        "/_cairn/events", params=[("type", "tag.set"), ("type", "manifest.pushed")]
    ).json()
    comma = api.get("/_cairn/events", params={"type": "tag.set,manifest.pushed"}).json()
    other = api.get("/_cairn/events", params={"repository": "library/other"}).json()

    assert [e["type"] for e in tags["events"]] == ["tag.set"]
    assert [e["type"] for e in both["events"]] == ["manifest.pushed", "tag.set"]
    assert comma["events"] == both["events"]
    assert [e["repository"] for e in other["events"]] == ["library/other"]
    # A family stands for all of its types.
    assert api.delete("/v2/library/app/manifests/v1").status_code == 202
    family = api.get("/_cairn/events", params={"type": "tag"}).json()
    assert [e["type"] for e in family["events"]] == ["tag.set", "tag.deleted"]
    dashboard = api.get("/_cairn/api/v1/events", params={"type": "tag"}).json()
    assert sorted(e["type"] for e in dashboard["events"]) == ["tag.deleted", "tag.set"]
    # A short filtered page lets the consumer skip to the head.
    assert tags["next_after"] == tags["head"]


def test_events_limit_capped(api: httpx.Client, registry: Registry) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    tags = registry.repository("library/app").tags
    for i in range(MAX_LIMIT):
        tags.tag(f"t{i}", image.digest)

    capped = api.get("/_cairn/events", params={"limit": MAX_LIMIT + 1})
    largest = api.get("/_cairn/events", params={"limit": MAX_INT64})
    rest = api.get("/_cairn/events", params={"after": MAX_LIMIT, "limit": MAX_LIMIT})

    assert capped.status_code == 200
    page = capped.json()
    positions = [event["position"] for event in page["events"]]
    assert positions == list(range(1, MAX_LIMIT + 1))
    assert page["next_after"] == MAX_LIMIT
    assert page["head"] > MAX_LIMIT
    assert largest.status_code == 200
    assert largest.json() == page
    assert rest.status_code == 200
    remaining = rest.json()
    assert remaining["events"][0]["position"] == MAX_LIMIT + 1
    assert remaining["next_after"] == remaining["head"] == page["head"]


@pytest.mark.parametrize("name", ["afer", "position", "n"])
def test_events_unknown_parameter(api: httpx.Client, name: str) -> None:
    response = api.get("/_cairn/events", params={name: "3"})

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == name
    assert error["detail"]["supported"] == ["after", "limit", "repository", "type"]


def test_events_repeated_repository(api: httpx.Client) -> None:
    response = api.get(
        "/_cairn/events", params=[("repository", "gc/a"), ("repository", "gc/b")]
    )

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == "repository"
    assert error["detail"]["values"] == ["gc/a", "gc/b"]


def test_events_repeated_type(api: httpx.Client) -> None:
    response = api.get(
        "/_cairn/events", params=[("type", "tag.set"), ("type", "blob.pushed")]
    )

    assert response.status_code == 200


def test_events_repository_invalid(api: httpx.Client) -> None:
    response = api.get("/_cairn/events", params={"repository": "Not/Valid"})

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "NAME_INVALID"
    assert error["detail"]["name"] == "Not/Valid"
