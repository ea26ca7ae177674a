"""Read-your-writes for dashboards: the Cairn-Position header and min_position.

Every response that reads the projections, including a 404 for an unknown
repository or tag, carries the log head, read in the same snapshot as its
data.
A client that has just pushed sends ``min_position`` (the position its push
reached, for example the previous response's Cairn-Position) and the request
waits until the projections have applied it, for at most MAX_WAIT_SECONDS.
After that the response reflects whatever position was reached, which its
Cairn-Position header shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy.engine import Connection

from engine import queries
from engine.api.dashboard import params
from engine.api.errors import HTTPError
from engine.api.http import Request, Response, json_response
from engine.api.threads import run_sync
from engine.db import Database
from engine.domain.errors import RegistryError

POSITION_HEADER: Final = "Cairn-Position"
MAX_WAIT_SECONDS: Final = 5.0
# Appends in another process do not reach this process's listeners, so the
# waiter also reads the checkpoint this often.
POLL_SECONDS: Final = 0.1

Query = Callable[[Connection], dict[str, Any]]


class PositionWaiter:
    """Wakes requests that wait for a position when this process appends."""

    def __init__(self, database: Database, max_wait: float = MAX_WAIT_SECONDS) -> None:
        self._database = database
        self.max_wait = max_wait
        self._wakers: set[Callable[[], None]] = set()
        database.append_listeners.append(self._appended)

    @property
    def waiting(self) -> int:
        """The number of requests waiting for a position now."""
        return len(self._wakers)

    def _appended(self, _events: list[Any]) -> None:
        # Called from the committing worker thread.
        for wake in list(self._wakers):
            wake()

    def _reached(self) -> int:
        with self._database.read() as conn:
            return queries.projection_position(conn)

    async def wait(self, position: int) -> bool:
        """Return True once the projections reach ``position``, False when
        ``max_wait`` seconds pass first."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            # The loop may close between an append and this call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(changed.set)

        deadline = time.monotonic() + self.max_wait
        self._wakers.add(wake)
        try:
            while True:
                changed.clear()
                if await run_sync(self._reached) >= position:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(), timeout=min(remaining, POLL_SECONDS)
                    )
        finally:
            self._wakers.discard(wake)


def _in_snapshot(database: Database, query: Query) -> tuple[int, dict[str, Any]]:
    with queries.snapshot(database) as conn:
        head = queries.log_head(conn)
        try:
            return head, query(conn)
        except RegistryError as error:
            # A repository or tag that is not found is not found as of this
            # position, so the error carries it too.
            raise HTTPError.from_registry_error(
                error, [(POSITION_HEADER, str(head))]
            ) from error


async def answer(request: Request, query: Query) -> Response:
    """Run ``query`` in one snapshot, after waiting for ``min_position``, and
    return its document as JSON with the Cairn-Position header."""
    minimum = params.integer(request, "min_position", None)
    waiter: PositionWaiter | None = request.state.position_waiter
    if minimum is not None and waiter is not None:
        await waiter.wait(minimum)
    head, document = await run_sync(
        _in_snapshot, request.state.registry.database, query
    )
    return json_response(document, headers=[(POSITION_HEADER, str(head))])
