"""GET /_cairn/health: the database, blob storage and event bus at a glance.

The status is 200 while the database and blob storage work and 503 when
either does not. The bus is reported but never fails the check, because an
unreachable NATS server delays events without blocking any push.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from engine import log as event_log
from engine.api.http import Request, Response, json_response
from engine.api.threads import run_sync
from engine.registry import Registry

log = structlog.get_logger(__name__)


def _database(registry: Registry) -> dict[str, Any]:
    report: dict[str, Any] = {"backend": registry.database.dialect}
    try:
        with registry.database.read() as conn:
            position, _ = event_log.head(conn)
    except Exception as error:
        log.warning("health_check_failed", component="database", error=str(error))
        return {**report, "status": "error", "error": _summary(error)}
    return {**report, "status": "ok", "log_position": position}


def _blob_storage(registry: Registry) -> dict[str, Any]:
    paths = registry.blob_store.paths
    report: dict[str, Any] = {"path": str(paths.root)}
    try:
        for directory in (paths.root / "blobs", paths.staging_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{directory} is missing or not writable")
        usage = os.statvfs(paths.root)
    except OSError as error:
        log.warning("health_check_failed", component="blobs", error=str(error))
        return {**report, "status": "error", "error": _summary(error)}
    return {
        **report,
        "status": "ok",
        "free_bytes": usage.f_bavail * usage.f_frsize,
    }


def _summary(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


async def health(request: Request) -> Response:
    registry = request.state.registry
    database = await run_sync(_database, registry)
    blobs = await run_sync(_blob_storage, registry)

    bus_report: dict[str, Any]
    bus = request.state.bus
    if bus is None:
        bus_report = {"state": "disabled"}
    else:
        try:
            bus_report = bus.health()
        except Exception as error:
            log.warning("health_check_failed", component="bus", error=str(error))
            bus_report = {"state": "error", "error": _summary(error)}

    healthy = database["status"] == "ok" and blobs["status"] == "ok"
    document = {
        "status": "ok" if healthy else "error",
        "database": database,
        "blobs": blobs,
        "bus": bus_report,
    }
    return json_response(document, 200 if healthy else 503)
