"""One endpoint's delivery loop over its durable JetStream consumer.

The consumer is a pull consumer named ``cairn-webhook-<endpoint>`` with
explicit acks and ``max_ack_pending = 1``. JetStream hands out the next
event only when the current one is settled. So each endpoint receives its
events in log order, one request at a time, and a restart resumes after the
last acknowledged event. A message is settled by

- ``ack`` after a 2xx response, or when the endpoint's filters skip it;
- ``nak`` with a delay after a failed attempt: JetStream redelivers it after
  the delay and counts the delivery, so the attempt number survives a
  restart;
- ``term`` once the attempts are used up and the event is a dead letter.

The worker also keeps the position of the last event it settled. When its
consumer is deleted while it runs, for example with the stream, it creates
the consumer again after that position (see ``consumers.webhook.consumer``)
and acknowledges without delivery any event at or below it, such as those
of a republish. It logs the positions that the re-created stream lacks.

An event that the relay sent as a stand-in without its payload, because it
was too large for NATS, is read in full from the registry's event feed
before it is delivered. A failed read counts as a failed attempt. Without
``[registry] url`` the stand-in is delivered as it is, with a warning.

Each endpoint runs in a task of its own with its own HTTP client, so a slow
or failing endpoint never delays another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Final

import httpx
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from consumers.backoff import retry_delay
from consumers.natsclient import NATS_ERRORS
from consumers.webhook.config import Endpoint, WebhookConfig
from consumers.webhook.consumer import (
    ResumePoint,
    acknowledged_position,
    ensure_consumer,
)
from consumers.webhook.dead_letters import DeadLetterStore
from consumers.webhook.delivery import Outcome, build_request, http_client, send
from consumers.webhook.lookup import EventLookup, EventLookupFailed, ManifestLookup
from consumers.webhook.payloads import (
    EVENT_TYPES,
    ManifestFacts,
    announced_by_tag_event,
    event_problem,
    media_type_of,
)
from engine.bus.connection import describe_nats_error
from engine.bus.messages import header_position, is_stand_in
from engine.domain.events import EventType

log = structlog.get_logger(__name__)

# How long one fetch waits for a message before asking again.
FETCH_WAIT: Final = 5.0
# Delays between attempts to (re)create the consumer after a NATS error.
RESUBSCRIBE_INITIAL: Final = 0.5
RESUBSCRIBE_MAX: Final = 30.0


class EndpointWorker:
    def __init__(
        self,
        endpoint: Endpoint,
        config: WebhookConfig,
        js: JetStreamContext,
        dead_letters: DeadLetterStore,
        lookup: ManifestLookup | None,
        events: EventLookup | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.config = config
        self.js = js
        self.dead_letters = dead_letters
        self.lookup = lookup
        self.events = events
        self.log = log.bind(endpoint=endpoint.name)
        # Every event at or before this log position was settled by this
        # process (delivered, skipped by the filters or dead-lettered) or
        # came before the first event of its consumer. None until known.
        self.handled_through: int | None = None
        # Set once this process has had a consumer, so that a consumer found
        # missing later was deleted while the webhook ran.
        self.had_consumer = False
        # On a re-created consumer, the position through which its events
        # were handled before, and how many of those it skipped.
        self.skip_through: int | None = None
        self.skipped = 0

    async def run(self) -> None:
        """Deliver until cancelled; NATS errors are logged and retried."""
        failures = 0
        async with http_client(self.endpoint) as client:
            while True:
                subscription: JetStreamContext.PullSubscription | None = None
                try:
                    subscription = await self._subscribe()
                    failures = 0
                    await self._consume(subscription, client)
                except nats.js.errors.NotFoundError:
                    failures += 1
                    delay = retry_delay(failures, RESUBSCRIBE_INITIAL, RESUBSCRIBE_MAX)
                    self.log.warning(
                        "stream_not_found",
                        stream=self.config.stream,
                        retry_in=round(delay, 2),
                        hint="is cairn serve publishing to this NATS server?",
                    )
                    await asyncio.sleep(delay)
                except NATS_ERRORS as error:
                    failures += 1
                    delay = retry_delay(failures, RESUBSCRIBE_INITIAL, RESUBSCRIBE_MAX)
                    self.log.warning(
                        "consumer_failed",
                        consumer=self.endpoint.consumer_name,
                        error=describe_nats_error(error),
                        retry_in=round(delay, 2),
                    )
                    await asyncio.sleep(delay)
                finally:
                    if subscription is not None:
                        with contextlib.suppress(*NATS_ERRORS):
                            await subscription.unsubscribe()

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        await self.dead_letters.ensure()
        resume = ResumePoint(self.handled_through) if self.had_consumer else None
        info, recreated = await ensure_consumer(
            self.js,
            self.config.stream,
            self.config.subject_prefix,
            self.endpoint,
            resume,
        )
        self.had_consumer = True
        if recreated:
            self.skip_through = self.handled_through
            self.skipped = 0
        elif self.handled_through is None:
            self.handled_through = await acknowledged_position(
                self.js, self.config.stream, info
            )
        subscription = await self.js.pull_subscribe_bind(
            durable=self.endpoint.consumer_name, stream=self.config.stream
        )
        self.log.info(
            "endpoint_subscribed",
            consumer=self.endpoint.consumer_name,
            stream=self.config.stream,
            url=self.endpoint.safe_url,
            format=self.endpoint.format,
        )
        return subscription

    async def _consume(
        self, subscription: JetStreamContext.PullSubscription, client: httpx.AsyncClient
    ) -> None:
        while True:
            try:
                messages = await subscription.fetch(1, timeout=FETCH_WAIT)
            except nats.errors.TimeoutError:
                continue
            for message in messages:
                await self._handle(message, client)

    async def _handle(self, message: Msg, client: httpx.AsyncClient) -> None:
        position = header_position(message.headers)
        if position is not None and self.skip_through is not None:
            if position <= self.skip_through:
                # Handled before the consumer was re-created, for example
                # when a republish refilled a re-created stream.
                self.skipped += 1
                await message.ack_sync()
                return
            self._end_skip(position)
        if position is not None and self.handled_through is None:
            # The first event of a consumer that had handled nothing.
            self.handled_through = position - 1
        attempt = message.metadata.num_delivered or 1
        event, problem = _decode(message)
        if event is None:
            self.log.error(
                "event_invalid",
                sequence=message.metadata.sequence.stream,
                problem=problem,
                note="not a cairn event; terminated without delivery",
            )
            await self._term(message)
            return
        ids = {
            "event_id": event["id"],
            "position": event.get("position"),
            "type": event["type"],
            "repository": event["repository"],
        }
        if event["type"] not in EVENT_TYPES:
            self.log.warning(
                "event_type_unknown",
                **ids,
                note="published by a newer cairn; skipped without delivery",
            )
            await self._ack(message)
            return
        if event["type"] == EventType.MANIFEST_PUSHED and self.lookup is not None:
            # Kept before the endpoint's filters, for the tag events that follow.
            self.lookup.remember(event)
        if not self.endpoint.accepts(event["type"], event["repository"]):
            await self._ack(message)
            return
        # A dead letter records the message as received: a stand-in stays a
        # stand-in there, because the full event may not fit in NATS either.
        received = event
        fetch_error: str | None = None
        if is_stand_in(event):
            event, fetch_error = await self._full_event(event, ids)
            if event["type"] == EventType.MANIFEST_PUSHED and self.lookup is not None:
                self.lookup.remember(event)
        if (
            self.endpoint.format == "distribution"
            and announced_by_tag_event(event)
            and self.endpoint.accepts(EventType.TAG_SET, event["repository"])
        ):
            await self._ack(message)
            return
        facts = await self._facts(event)
        if self.endpoint.ignores_media_type(media_type_of(event, facts)):
            await self._ack(message)
            return

        if attempt > self.endpoint.max_attempts:
            # The last attempt was made, then the process stopped before
            # recording its failure.
            await self._dead_letter(message, received, attempt - 1, None, None, ids)
            return
        if fetch_error is not None:
            outcome = Outcome(False, None, fetch_error, 0.0)
        else:
            request = build_request(
                self.endpoint, event, self.config.registry_url, facts
            )
            try:
                outcome = await send(client, self.endpoint, request, attempt)
            except asyncio.CancelledError:
                # Shutting down mid-request: hand the event back at once so
                # the next run delivers it without waiting for ack_wait.
                with contextlib.suppress(*NATS_ERRORS):
                    await asyncio.shield(message.nak())
                raise

        if outcome.delivered:
            await self._ack(message)
            self.log.info(
                "event_delivered",
                **ids,
                attempt=attempt,
                status=outcome.status,
                seconds=outcome.seconds,
            )
            return
        if attempt >= self.endpoint.max_attempts:
            await self._dead_letter(
                message, received, attempt, outcome.status, outcome.error, ids
            )
            return
        delay = retry_delay(
            attempt, self.endpoint.backoff_initial, self.endpoint.backoff_max
        )
        await message.nak(delay=delay)
        self.log.warning(
            "delivery_failed",
            **ids,
            attempt=attempt,
            max_attempts=self.endpoint.max_attempts,
            status=outcome.status,
            error=outcome.error,
            retry_in=round(delay, 2),
        )

    def _end_skip(self, position: int) -> None:
        """Log the skipped events, and the events that a re-created stream
        lacks before ``position``, the first event after those handled.

        Log positions have no gaps and the consumer has no subject filter,
        so a jump means that the re-created stream lacks the events in
        between. The relay had published them before the stream was deleted,
        and it continued after them.
        """
        handled = self.skip_through
        assert handled is not None
        self.skip_through = None
        if self.skipped:
            self.log.info(
                "handled_events_skipped",
                consumer=self.endpoint.consumer_name,
                count=self.skipped,
                through_position=handled,
            )
        if position <= handled + 1:
            return
        # NOTE: the missing events are logged, not read from the registry's
        # event feed and delivered, even where [registry] url is set.
        self.log.error(
            "events_missing_from_stream",
            consumer=self.endpoint.consumer_name,
            stream=self.config.stream,
            first_missing=handled + 1,
            last_missing=position - 1,
            note="these events are not in the re-created stream, so this "
            "endpoint does not receive them; read them from GET "
            f"/_cairn/events?after={handled}",
        )

    async def _ack(self, message: Msg) -> None:
        """Record ``message`` as handled, then acknowledge it."""
        self._record_handled(message)
        await message.ack_sync()

    async def _term(self, message: Msg) -> None:
        """Record ``message`` as handled, then stop JetStream's redeliveries."""
        self._record_handled(message)
        await message.term()

    def _record_handled(self, message: Msg) -> None:
        # Recorded before the ack, because an ack that fails when the
        # consumer was deleted must not make a re-created one redeliver it.
        position = header_position(message.headers)
        if position is not None:
            self.handled_through = position

    async def _full_event(
        self, stand_in: dict[str, Any], ids: dict[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """Read the event that ``stand_in`` replaces from the event feed.

        Returns the event and None, or the stand-in and the reason the read
        failed. Without an event feed to read, returns the stand-in and None.
        """
        if self.events is None:
            self.log.warning(
                "event_payload_omitted",
                **ids,
                note="NATS carried this event without its payload, so it is "
                "delivered without it; set [registry] url to read the full "
                "event from the registry's event feed",
            )
            return stand_in, None
        position = stand_in.get("position")
        if not isinstance(position, int):
            return stand_in, "the stand-in carries no position"
        try:
            event = await self.events.event(position, stand_in["id"])
        except EventLookupFailed as error:
            return stand_in, str(error)
        self.log.info("event_read_from_feed", **ids, reason="payload omitted on NATS")
        return event, None

    async def _facts(self, event: dict[str, Any]) -> ManifestFacts | None:
        if event["type"] != EventType.TAG_SET or self.lookup is None:
            return None
        digest = (event.get("payload") or {}).get("digest")
        if not isinstance(digest, str):
            return None
        return await self.lookup.facts(event["repository"], digest)

    async def _dead_letter(
        self,
        message: Msg,
        event: dict[str, Any],
        attempts: int,
        status: int | None,
        error: str | None,
        ids: dict[str, Any],
    ) -> None:
        await self.dead_letters.add(self.endpoint.name, event, attempts, status, error)
        await self._term(message)
        self.log.error(
            "event_dead_lettered",
            **ids,
            attempts=attempts,
            status=status,
            error=error,
            stream=self.dead_letters.stream,
        )


def _decode(message: Msg) -> tuple[dict[str, Any] | None, str | None]:
    """Return the event in ``message``, or None and what makes it invalid."""
    try:
        event = json.loads(message.data)
    except ValueError as error:
        return None, f"the message is not JSON: {error}"
    problem = event_problem(event)
    if problem is not None:
        return None, problem
    return event, None
