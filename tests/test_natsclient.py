"""The consumers' shared NATS connection against a real nats-server."""

from __future__ import annotations

import asyncio
import os
import signal

from consumers.natsclient import connect
from tests.nats import (
    NatsServer,
    run,
)


async def _notice_hung_server(nats_server: NatsServer) -> list[str]:
    pid = nats_server.pid
    assert pid is not None
    changes: list[str] = []
    disconnected = asyncio.Event()
    reconnected = asyncio.Event()

    async def on_disconnected() -> None:
        changes.append("disconnected")
        disconnected.set()

    async def on_reconnected() -> None:
        changes.append("reconnected")
        reconnected.set()

    client = await connect(
        nats_server.url,
        "cairn test",
        on_disconnected=on_disconnected,
        on_reconnected=on_reconnected,
        ping_interval=1,
        max_outstanding_pings=1,
    )
    try:
        # A stopped process keeps its sockets open but sends nothing, as a
        # hung server would.
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.wait_for(disconnected.wait(), 20)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(reconnected.wait(), 20)
        await client.flush(timeout=5)
    finally:
        await client.close()
    return changes


def test_connection_notices_hung_server(nats_server: NatsServer) -> None:
    changes = run(_notice_hung_server(nats_server), timeout=60)
    assert changes[:2] == ["disconnected", "reconnected"]
