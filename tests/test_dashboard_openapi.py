"""The dashboard API against its OpenAPI description, with schemathesis.

schemathesis generates requests from the description (valid values and, for
the negative phase, invalid ones) and sends them to an in-process server on
127.0.0.1. Each response must match the documented status codes, headers and
schemas, and none may be a 5xx.

The check that every schema-valid request gets a 2xx is left out, because
some constraints have no OpenAPI form. A cursor must come from a previous
page, at and position exclude each other, and times must fall in the years
1970 to 9998, so a 400 for such a request is correct.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from engine.api.app import create_app
from engine.api.dashboard.consistency import PositionWaiter
from engine.api.dashboard.openapi import document
from engine.migrate import upgrade
from engine.registry import Registry
from tests.images import make_artifact, make_image
from tests.server import ServerThread, push_image, running

MAX_EXAMPLES = 30

schema = schemathesis.openapi.from_dict(document())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server on SQLite with a little content for the generated requests."""
    data_dir: Path = tmp_path_factory.mktemp("openapi") / "data"
    registry = Registry.open(data_dir)
    upgrade(registry.database)
    app = create_app(registry)
    # Generated min_position values are mostly past the log head; a short
    # wait keeps each of those requests quick.
    app.state.position_waiter = PositionWaiter(registry.database, max_wait=0.05)
    with (
        running(app) as served,
        httpx.Client(base_url=served.url, timeout=60) as client,
    ):
        image = make_image()
        for name in ("a", "library/app"):
            push_image(client, name, image, "v1")
            push_image(client, name, make_image(), "v1")
        push_image(client, "a", make_artifact(image, "application/x.sig", b"s"))
        yield served
    registry.database.dispose()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_matches_description(case: schemathesis.Case, server: ServerThread) -> None:
    case.call_and_validate(
        base_url=f"{server.url}/_cairn/api/v1",
        timeout=30,
        excluded_checks=[positive_data_acceptance],
    )


def test_every_query_lists_unavailable() -> None:
    # Every query reads the database, so any of them can get a 503 while the
    # database is busy or unreachable. The description itself reads nothing.
    for path, item in document()["paths"].items():
        if path == "/openapi.json":
            continue
        for method, operation in item.items():
            unavailable = operation["responses"].get("503")
            assert unavailable is not None, (method, path)
            assert "Retry-After" in unavailable["headers"], (method, path)
