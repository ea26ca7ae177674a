"""`cairn webhook`: one delivery task per endpoint until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Final

import structlog

from consumers.natsclient import NATS_ERRORS, connect
from consumers.webhook.config import WebhookConfig
from consumers.webhook.dead_letters import DeadLetterStore
from consumers.webhook.lookup import registry_lookups
from consumers.webhook.positions import PositionStore
from consumers.webhook.worker import EndpointWorker
from engine.bus.connection import redact_url

log = structlog.get_logger(__name__)

# How long a stop cancels the endpoint tasks again while one still runs,
# and how often.
CANCEL_TIMEOUT: Final = 10.0
CANCEL_INTERVAL: Final = 0.1
# How long a stop waits for the last positions to be stored.
POSITION_WRITE_TIMEOUT: Final = 5.0


async def run_webhook(config: WebhookConfig, nats_url: str) -> int:
    """Deliver events until a signal arrives; return the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    log.info(
        "webhook_starting",
        nats_url=redact_url(nats_url),
        endpoints=[endpoint.name for endpoint in config.endpoints],
    )
    connecting = asyncio.create_task(connect(nats_url, "cairn webhook"))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        log.info("webhook_stopped", status=0)
        return 0
    client = connecting.result()

    js = client.jetstream()
    dead_letters = DeadLetterStore(
        js,
        config.dead_letter_stream,
        config.dead_letter_prefix,
        max_payload=lambda: client.max_payload,
    )
    positions = PositionStore(js)
    lookup, events = registry_lookups(config)
    endpoint_workers = [
        EndpointWorker(endpoint, config, js, dead_letters, positions, lookup, events)
        for endpoint in config.endpoints
    ]
    workers = {
        asyncio.create_task(
            worker.run(), name=f"cairn-webhook-{worker.endpoint.name}"
        ): worker.endpoint.name
        for worker in endpoint_workers
    }
    status = 0
    try:
        done, _ = await asyncio.wait(
            [stopping, *workers], return_when=asyncio.FIRST_COMPLETED
        )
        for worker, name in workers.items():
            if worker in done and worker.exception() is not None:
                # A worker only returns through a bug: NATS and HTTP errors
                # are retried inside it.
                log.error(
                    "endpoint_task_failed",
                    endpoint=name,
                    error=repr(worker.exception()),
                )
                status = 1
    finally:
        await cancel_workers(workers)
        stopping.cancel()
        await write_positions(endpoint_workers)
        if lookup is not None:
            await lookup.aclose()
        if events is not None:
            await events.aclose()
        with contextlib.suppress(*NATS_ERRORS):
            await asyncio.wait_for(client.close(), 5.0)
    log.info("webhook_stopped", status=status)
    return status


async def write_positions(workers: list[EndpointWorker]) -> None:
    """Store each endpoint's last handled position, waiting at most
    POSITION_WRITE_TIMEOUT seconds. Each worker logs its own failure."""
    writes = asyncio.gather(*(worker.write_position() for worker in workers))
    try:
        await asyncio.wait_for(writes, POSITION_WRITE_TIMEOUT)
    except TimeoutError:
        log.warning(
            "position_write_timed_out",
            seconds=POSITION_WRITE_TIMEOUT,
            note="a consumer deleted while no webhook runs resumes from the "
            "last position written before",
        )


async def cancel_workers(workers: dict[asyncio.Task[None], str]) -> None:
    """Cancel the endpoint tasks and wait for them to end.

    nats-py catches CancelledError in places, for example while it flushes
    an acknowledgement (``Client._flush_pending`` in nats-py 2.16), so a task
    cancelled there goes on running. Such a task is cancelled again until it
    ends, for at most CANCEL_TIMEOUT seconds.
    """
    pending = set(workers)
    deadline = asyncio.get_running_loop().time() + CANCEL_TIMEOUT
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_INTERVAL)
        if asyncio.get_running_loop().time() >= deadline:
            break
    if pending:
        log.warning(
            "endpoint_tasks_still_running",
            endpoints=sorted(workers[task] for task in pending),
            note="closing the NATS connection ends them",
        )
