"""GET /metrics: request counts, bytes, latency histograms, appended events,
projection lag and relay lag, in the Prometheus text format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.api.app import create_app
from engine.domain.events import Actor
from engine.registry import Registry
from tests.images import make_image
from tests.server import log_position, push_image, running


class FakeBus:
    """Stands in for the event bus: reports a fixed relay lag."""

    def __init__(self, health: dict[str, Any]) -> None:
        self._health = health

    def health(self) -> dict[str, Any]:
        return self._health

    def notify_pull(
        self,
        repository: str,
        reference: str,
        digest: str,
        actor: Actor,
        request_id: str | None,
    ) -> None:
        pass


def scrape(
    client: httpx.Client,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of /metrics keyed by name and sorted labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def api(registry: Registry) -> Iterator[httpx.Client]:
    with (
        running(create_app(registry)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        yield client


def test_requests_and_bytes_counted(api: httpx.Client) -> None:
    image = make_image(layer_count=2, layer_size=5000)
    push_image(api, "app", image, "v1")
    api.get("/v2/app/manifests/v1")
    api.get("/no/such/path")

    samples = scrape(api)

    assert (
        value(
            samples,
            "cairn_http_requests_total",
            route="manifests.put_manifest",
            method="PUT",
            status="201",
        )
        == 1
    )
    assert (
        value(
            samples,
            "cairn_http_requests_total",
            route="uploads.finish_upload",
            method="PUT",
            status="201",
        )
        == 3
    )
    assert (
        value(
            samples,
            "cairn_http_requests_total",
            route="unmatched",
            method="GET",
            status="404",
        )
        == 1
    )
    received = value(
        samples, "cairn_http_received_bytes_total", route="uploads.finish_upload"
    )
    assert received == sum(len(blob) for blob in image.blobs)
    sent = value(samples, "cairn_http_sent_bytes_total", route="manifests.get_manifest")
    assert sent == len(image.manifest)


def test_latency_histograms(api: httpx.Client) -> None:
    push_image(api, "app", make_image(), "v1")
    push_image(api, "app", make_image(), "v2")

    samples = scrape(api)

    assert value(samples, "cairn_manifest_put_duration_seconds_count") == 2
    assert value(samples, "cairn_blob_upload_duration_seconds_count", method="PUT") == 4
    assert (
        value(samples, "cairn_blob_upload_duration_seconds_count", method="POST") == 4
    )
    assert (
        value(
            samples,
            "cairn_http_request_duration_seconds_count",
            route="manifests.put_manifest",
            method="PUT",
        )
        == 2
    )


def test_appended_events_and_projection_lag(
    api: httpx.Client, registry: Registry
) -> None:
    push_image(api, "app", make_image(), "v1")
    registry.repository("app").tags.untag("v1")

    samples = scrape(api)

    assert value(samples, "cairn_events_appended_total", type="blob.pushed") == 2
    assert value(samples, "cairn_events_appended_total", type="manifest.pushed") == 1
    assert value(samples, "cairn_events_appended_total", type="tag.set") == 1
    assert value(samples, "cairn_events_appended_total", type="tag.deleted") == 1
    assert value(samples, "cairn_log_position") == log_position(registry)
    assert value(samples, "cairn_projection_lag_events", projection="tags") == 0
    assert value(samples, "cairn_projection_lag_events", projection="activity") == 0


def test_projection_lag_after_checkpoint_falls_behind(
    api: httpx.Client, registry: Registry
) -> None:
    push_image(api, "app", make_image(), "v1")
    with registry.database.transaction() as conn:
        conn.exec_driver_sql(
            "UPDATE projection_checkpoints SET position = 1 WHERE name = 'catalog'"
        )

    samples = scrape(api)

    lag = value(samples, "cairn_projection_lag_events", projection="catalog")
    assert lag == log_position(registry) - 1


def test_relay_lag_from_bus(registry: Registry) -> None:
    bus = FakeBus({"state": "connected", "lag_events": 7, "lag_seconds": 1.5})
    with (
        running(create_app(registry, bus)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        samples = scrape(client)

    assert value(samples, "cairn_relay_lag_events") == 7
    assert value(samples, "cairn_relay_lag_seconds") == 1.5


def test_relay_lag_absent_without_bus(api: httpx.Client) -> None:
    samples = scrape(api)

    assert ("cairn_relay_lag_events", ()) not in samples


def test_each_app_counts_alone(registry: Registry) -> None:
    with (
        running(create_app(registry)) as first_server,
        running(create_app(registry)) as second_server,
        httpx.Client(base_url=first_server.url) as first,
        httpx.Client(base_url=second_server.url) as second,
    ):
        first.get("/v2/")
        first.get("/v2/")
        second.get("/v2/")

        first_samples = scrape(first)
        second_samples = scrape(second)

    labels = {"route": "app.base", "method": "GET", "status": "200"}
    assert value(first_samples, "cairn_http_requests_total", **labels) == 2
    assert value(second_samples, "cairn_http_requests_total", **labels) == 1
