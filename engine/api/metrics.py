"""Prometheus metrics: requests, bytes, latencies, appended events and lag.

Each app has its own CollectorRegistry, so several apps in one process (as
in the tests) keep separate counts. Lag gauges are read when /metrics is
scraped: relay lag from the bus's health(), projection lag as the log head
minus each projection's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from engine import queries
from engine.api.http import Request, Response
from engine.api.threads import run_sync
from engine.projections import ALL_PROJECTIONS, checkpoints
from engine.registry import Registry

if TYPE_CHECKING:
    from engine.api.app import PullListener

log = structlog.get_logger(__name__)

# Route labels (handler module and name) whose latency has its own histogram.
UPLOAD_ROUTES: Final = frozenset(
    {"uploads.start_upload", "uploads.patch_upload", "uploads.finish_upload"}
)
MANIFEST_PUT_ROUTE: Final = "manifests.put_manifest"

# Seconds; uploads run from milliseconds for a small blob to minutes for a
# large layer over a slow link.
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
UPLOAD_BUCKETS: Final = (*LATENCY_BUCKETS, 30.0, 60.0, 300.0, 900.0)


class _LagCollector(Collector):
    """Gauges computed at scrape time from the database and the bus."""

    def __init__(self, registry: Registry, bus: PullListener | None) -> None:
        self._registry = registry
        self._bus = bus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._projection_lag()
        yield from self._relay_lag()

    def _projection_lag(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self._registry.database.read() as conn:
                head = queries.log_head(conn)
                found = checkpoints(conn)
        except SQLAlchemyError as error:
            log.warning("metrics_database_failed", error=str(error))
            return
        yield GaugeMetricFamily(
            "cairn_log_position", "Position of the last event in the log.", head
        )
        lag = GaugeMetricFamily(
            "cairn_projection_lag_events",
            "Events in the log that a projection has not applied yet.",
            labels=["projection"],
        )
        for projection in ALL_PROJECTIONS:
            lag.add_metric(
                [projection.name], max(0, head - found.get(projection.name, 0))
            )
        yield lag

    def _relay_lag(self) -> Iterator[GaugeMetricFamily]:
        if self._bus is None:
            return
        try:
            health = self._bus.health()
        except Exception as error:
            log.warning("metrics_bus_health_failed", error=str(error))
            return
        for key, name, documentation in (
            (
                "lag_events",
                "cairn_relay_lag_events",
                "Committed events not yet acknowledged by JetStream.",
            ),
            (
                "lag_seconds",
                "cairn_relay_lag_seconds",
                "Age of the oldest event not yet acknowledged by JetStream.",
            ),
        ):
            value = health.get(key)
            if value is not None:
                yield GaugeMetricFamily(name, documentation, float(value))


@dataclass(frozen=True, slots=True)
class _RequestChildren:
    """The metric children that one route, method and status update."""

    requests: Any
    received: Any
    sent: Any
    latency: Any
    duration: Any


class Metrics:
    """The app's metrics and the /metrics handler."""

    def __init__(self, registry: Registry, bus: PullListener | None = None) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cairn_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.collectors,
        )
        self.received = Counter(
            "cairn_http_received_bytes",
            "Request body bytes received, by route.",
            ["route"],
            registry=self.collectors,
        )
        self.sent = Counter(
            "cairn_http_sent_bytes",
            "Response body bytes sent, by route.",
            ["route"],
            registry=self.collectors,
        )
        self.latency = Histogram(
            "cairn_http_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.collectors,
        )
        self.upload_latency = Histogram(
            "cairn_blob_upload_duration_seconds",
            "Duration of upload requests that carry blob data or finish an upload.",
            ["method"],
            buckets=UPLOAD_BUCKETS,
            registry=self.collectors,
        )
        self.manifest_put_latency = Histogram(
            "cairn_manifest_put_duration_seconds",
            "Duration of manifest PUT requests.",
            buckets=LATENCY_BUCKETS,
            registry=self.collectors,
        )
        self.appended = Counter(
            "cairn_events_appended",
            "Events this process appended to the log, by type.",
            ["type"],
            registry=self.collectors,
        )
        # labels() takes a lock and builds a key on every call; a request
        # looks up its children here instead. Routes, methods, statuses and
        # event types are finite sets, so these dicts stay small.
        self._request_children: dict[tuple[str, str, int], _RequestChildren] = {}
        self._appended_children: dict[object, Any] = {}
        self.collectors.register(_LagCollector(registry, bus))
        registry.database.append_listeners.append(self._count_appended)

    def _count_appended(self, events: list[Any]) -> None:
        for event in events:
            child = self._appended_children.get(event.type)
            if child is None:
                child = self.appended.labels(str(event.type))
                self._appended_children[event.type] = child
            child.inc()

    def observe(
        self,
        route: str,
        method: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        """Record one finished request."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._children_of(route, method, status)
            self._request_children[key] = children
        children.requests.inc()
        children.received.inc(bytes_in)
        children.sent.inc(bytes_out)
        children.latency.observe(seconds)
        if children.duration is not None:
            children.duration.observe(seconds)

    def _children_of(self, route: str, method: str, status: int) -> _RequestChildren:
        duration: Any = None
        if route in UPLOAD_ROUTES and method in ("POST", "PATCH", "PUT"):
            duration = self.upload_latency.labels(method)
        elif route == MANIFEST_PUT_ROUTE and method == "PUT":
            duration = self.manifest_put_latency
        return _RequestChildren(
            requests=self.requests.labels(route, method, str(status)),
            received=self.received.labels(route),
            sent=self.sent.labels(route),
            latency=self.latency.labels(route, method),
            duration=duration,
        )

    async def handle(self, request: Request) -> Response:
        """Serve GET /metrics in the Prometheus text format."""
        body = await run_sync(generate_latest, self.collectors)
        return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)
