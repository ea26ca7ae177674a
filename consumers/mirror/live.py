"""Events as NATS delivers them, for a mirror that has caught up.

A background task connects (retrying for as long as the mirror runs) and
reads the event stream through an ephemeral ordered consumer that starts
at new messages. Messages go into a bounded queue, and a message that
arrives while the queue is full is dropped. The mirror then finds a gap in
positions and reads the missing events from the HTTP feed. The feed is the
source of truth, so nothing here has to be reliable: NATS only makes the
mirror prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Final

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from consumers.backoff import retry_delay
from consumers.natsclient import NATS_ERRORS, connect
from engine.bus.connection import redact_url
from engine.bus.subjects import filter_subject

log = structlog.get_logger(__name__)

QUEUE_SIZE: Final = 10_000


class LiveEvents:
    def __init__(self, url: str, stream: str, subject_prefix: str) -> None:
        self.url = url
        self.stream = stream
        self.subject = filter_subject(subject_prefix)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self.subscribed = asyncio.Event()
        self.dropped = 0
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cairn-mirror-nats")

    async def _run(self) -> None:
        log.info(
            "nats_connecting",
            url=redact_url(self.url),
            note="the mirror polls the HTTP feed until NATS is reachable",
        )
        self._client = await connect(self.url, "cairn mirror")
        js = self._client.jetstream()
        failures = 0
        while not self.subscribed.is_set():
            try:
                await js.subscribe(
                    self.subject,
                    stream=self.stream,
                    ordered_consumer=True,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
                    cb=self._on_message,
                )
            except NATS_ERRORS as error:
                failures += 1
                delay = retry_delay(failures, 1.0, 30.0)
                log.warning(
                    "nats_subscribe_failed",
                    url=redact_url(self.url),
                    stream=self.stream,
                    error=str(error) or type(error).__name__,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            self.subscribed.set()
            log.info("nats_following", url=redact_url(self.url), stream=self.stream)

    async def _on_message(self, message: Msg) -> None:
        try:
            event = json.loads(message.data)
        except ValueError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("position"), int):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None and not self._client.is_closed:
            with contextlib.suppress(*NATS_ERRORS):
                await asyncio.wait_for(self._client.close(), 5.0)
