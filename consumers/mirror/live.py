"""Events as NATS delivers them, for a mirror that has caught up.

A background task connects (retrying for as long as the mirror runs) and
reads the event stream through an ephemeral ordered consumer that starts
at new messages. Messages go into a bounded queue, and a message that
arrives while the queue is full is dropped. The mirror then finds a gap in
positions and reads the missing events from the HTTP feed. The feed is the
source of truth, so nothing here has to be reliable: NATS only makes the
mirror prompt. While the connection is down, ``following`` is false and the
mirror polls the feed instead. After a reconnection the consumer is created
again, because a restarted server has lost it. A server that stops
responding but keeps the TCP connection open counts as disconnected once
its pings go unanswered (consumers.natsclient), and the mirror polls until
it reconnects. While the stream stores no subject under the subject prefix,
such as after a typo in ``--subject-prefix``, the mirror logs a warning,
polls, and checks the stream's subjects again every 30 s.

Each event keeps the registry id from its message's ``Cairn-Registry-Id``
header, which distinguishes the source's events from those of another
registry that publishes to the same stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from asyncio import FIRST_COMPLETED
from dataclasses import dataclass
from typing import Any, Final

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from consumers.backoff import retry_delay
from consumers.natsclient import NATS_ERRORS, connect
from engine.bus.connection import describe_nats_error, redact_url
from engine.bus.messages import REGISTRY_ID
from engine.bus.subjects import filter_subject, unstored_subject_error

log = structlog.get_logger(__name__)

QUEUE_SIZE: Final = 10_000
# How often the stream is checked again while it stores no subject under the
# subject prefix. `cairn serve` sets the stream's subjects when it starts, so
# they can change while the mirror runs.
SUBJECTS_CHECK_INTERVAL: Final = 30.0


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """An event as NATS delivered it, and the registry id that its message's
    header names, None for a message without the header (published by a
    cairn older than the header)."""

    event: dict[str, Any]
    registry_id: str | None


class LiveEvents:
    def __init__(self, url: str, stream: str, subject_prefix: str) -> None:
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.subject = filter_subject(subject_prefix)
        self.queue: asyncio.Queue[LiveEvent] = asyncio.Queue(QUEUE_SIZE)
        # Set while the consumer of the current connection delivers.
        self.subscribed = asyncio.Event()
        # Whether a consumer has delivered at some time, logged as
        # nats_following the first time.
        self.has_followed = False
        self.dropped = 0
        # The highest position of a message received from the source, for
        # progress reports.
        self.highest_position = 0
        # The source's registry id once the mirror has read it. Messages whose
        # header names another registry then leave highest_position alone.
        self.source_registry_id: str | None = None
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        # Set when ``following`` may have changed.
        self._changed = asyncio.Event()
        self._reconnected = asyncio.Event()

    @property
    def following(self) -> bool:
        """Whether messages can arrive: subscribed, and connected now."""
        client = self._client
        return self.subscribed.is_set() and client is not None and client.is_connected

    async def next_event(self, timeout: float) -> LiveEvent | None:
        """Return the next queued event.

        Returns None after ``timeout`` seconds without one, and at once when
        the connection is down or is lost while this waits.
        """
        if not self.queue.empty():
            return self.queue.get_nowait()
        self._changed.clear()
        if not self.following:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait(
                {getter, changed}, timeout=timeout, return_when=FIRST_COMPLETED
            )
        finally:
            getter.cancel()
            changed.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    async def wait_changed(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for ``following`` to change."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    async def _on_disconnected(self) -> None:
        self.subscribed.clear()
        self._changed.set()

    async def _on_reconnected(self) -> None:
        self._reconnected.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cairn-mirror-nats")

    async def _run(self) -> None:
        log.info(
            "nats_connecting",
            url=redact_url(self.url),
            note="the mirror polls the HTTP feed until NATS is reachable",
        )
        self._client = await connect(
            self.url,
            "cairn mirror",
            on_disconnected=self._on_disconnected,
            on_reconnected=self._on_reconnected,
        )
        js = self._client.jetstream()
        subscriptions = 0
        while True:
            subscription = await self._subscribe(js)
            subscriptions += 1
            self.has_followed = True
            self.subscribed.set()
            self._changed.set()
            if subscriptions == 1:
                log.info("nats_following", url=redact_url(self.url), stream=self.stream)
            else:
                log.debug(
                    "nats_resubscribed", url=redact_url(self.url), stream=self.stream
                )
            await self._reconnected.wait()
            self._reconnected.clear()
            self.subscribed.clear()
            with contextlib.suppress(*NATS_ERRORS):
                await subscription.unsubscribe()

    async def _subscribe(
        self, js: JetStreamContext
    ) -> JetStreamContext.PushSubscription:
        # Create an ordered consumer of new messages, retrying until it exists.
        failures = 0
        warned = False
        while True:
            self._reconnected.clear()
            try:
                unstored = await self._unstored_subject(js)
                if unstored is None:
                    return await js.subscribe(
                        self.subject,
                        stream=self.stream,
                        ordered_consumer=True,
                        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
                        cb=self._on_message,
                    )
                # A consumer would receive nothing, and the mirror following it
                # would read the feed only at its 30 s resync. Polling keeps
                # the mirror prompt.
                if not warned:
                    log.warning(
                        "nats_subject_not_stored",
                        url=redact_url(self.url),
                        stream=self.stream,
                        subject_prefix=self.subject_prefix,
                        error=unstored,
                        check_again_in=SUBJECTS_CHECK_INTERVAL,
                        note="the mirror polls the HTTP feed meanwhile",
                    )
                    warned = True
                delay = SUBJECTS_CHECK_INTERVAL
            except NATS_ERRORS as error:
                failures += 1
                delay = retry_delay(failures, 1.0, 30.0)
                log.warning(
                    "nats_subscribe_failed",
                    url=redact_url(self.url),
                    stream=self.stream,
                    error=describe_nats_error(error, self._client),
                    retry_in=round(delay, 2),
                )
            # A reconnection cuts the delay short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconnected.wait(), delay)

    async def _unstored_subject(self, js: JetStreamContext) -> str | None:
        """Describe why the stream stores no event under the subject prefix,
        or return None when it stores some."""
        info = await js.stream_info(self.stream)
        return unstored_subject_error(
            self.stream, info.config.subjects or [], self.subject, self.subject_prefix
        )

    async def _on_message(self, message: Msg) -> None:
        try:
            event = json.loads(message.data)
        except ValueError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("position"), int):
            return
        registry_id = (message.headers or {}).get(REGISTRY_ID)
        if registry_id is None or self.source_registry_id in (None, registry_id):
            self.highest_position = max(self.highest_position, event["position"])
        try:
            self.queue.put_nowait(LiveEvent(event, registry_id))
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
