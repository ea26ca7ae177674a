"""One endpoint's delivery loop over its durable JetStream consumer.

The consumer is a pull consumer named ``cairn-webhook-<endpoint>`` with
explicit acks and ``max_ack_pending = 1``. JetStream hands out the next
event only when the current one is settled. So each endpoint receives its
events in log order, one request at a time, and a restart resumes after the
last acknowledged event. A message is settled by

- ``ack`` after a 2xx response, or when the endpoint's filters skip it;
- ``nak`` with a delay after a failed attempt: JetStream redelivers it after
  the delay;
- ``term`` once the attempts are used up and the event is a dead letter.

Each failed attempt is stored in the position bucket before the message is
settled, so the attempt number and a dead letter's last failure survive a
restart. JetStream's delivery count is not used for them, because it also
counts a delivery whose attempt the webhook's own stop cut off: a stop
during a request hands the message back with ``nak``, and the next run
makes that attempt again.

The worker also keeps the position of the last event it settled, and
stores it in the position bucket (``consumers.webhook.positions``) at most
once per POSITION_WRITE_INTERVAL and when the webhook stops. When its
consumer is deleted, for example with the stream, the consumer is created
again after that position (see ``consumers.webhook.consumer``), and the
worker acknowledges without delivery any event at or below it, such as
those of a republish. When the re-created stream lacks the events after
that position, the worker reads them from the registry's event feed and
delivers them before the event that follows them. Without ``[registry]
url`` it logs their positions.

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
from dataclasses import dataclass
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
    stored_position_fits,
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
from consumers.webhook.positions import (
    FailedAttempts,
    PositionStore,
    StoredPosition,
)
from engine.bus.connection import describe_nats_error
from engine.bus.messages import EVENT_ID, REGISTRY_ID, header_position, is_stand_in
from engine.bus.subjects import unstored_subject_error
from engine.domain.events import EventType

log = structlog.get_logger(__name__)

# How long one fetch waits for a message before asking again.
FETCH_WAIT: Final = 5.0
# Delays between attempts to (re)create the consumer after a NATS error.
RESUBSCRIBE_INITIAL: Final = 0.5
RESUBSCRIBE_MAX: Final = 30.0
# Seconds between writes of the handled position to the position bucket.
POSITION_WRITE_INTERVAL: Final = 1.0
# Seconds between logs of failed position writes while they keep failing.
POSITION_FAILURE_LOG_INTERVAL: Final = 60.0


class EndpointWorker:
    def __init__(
        self,
        endpoint: Endpoint,
        config: WebhookConfig,
        js: JetStreamContext,
        dead_letters: DeadLetterStore,
        positions: PositionStore,
        lookup: ManifestLookup | None,
        events: EventLookup | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.config = config
        self.js = js
        self.dead_letters = dead_letters
        self.positions = positions
        self.lookup = lookup
        self.events = events
        self.log = log.bind(endpoint=endpoint.name)
        # Every event at or before this log position was settled by this
        # process (delivered, skipped by the filters or dead-lettered) or
        # came before the first event of its consumer. None until known.
        self.handled_through: int | None = None
        # The last event this process settled, as the position bucket
        # stores it, and the last value written there.
        self.last_settled: StoredPosition | None = None
        self.last_written: StoredPosition | None = None
        self.write_failed_logged_at: float | None = None
        # Set once this process has had a consumer, so that a consumer found
        # missing later was deleted while the webhook ran.
        self.had_consumer = False
        # On a re-created consumer, the position through which its events
        # were handled before, and how many of those it skipped.
        self.skip_through: int | None = None
        # Whether the stream stored no subject under the subject prefix at
        # the last subscription, which was then logged.
        self.warned_unstored_subject = False
        self.skipped = 0
        # The failed attempts of the event being retried, as last stored.
        self.failures: FailedAttempts | None = None

    async def run(self) -> None:
        """Deliver until cancelled; NATS errors are logged and retried."""
        writer = asyncio.create_task(self._write_positions())
        try:
            await self._deliver()
        finally:
            writer.cancel()

    async def _deliver(self) -> None:
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

    async def _write_positions(self) -> None:
        while True:
            await asyncio.sleep(POSITION_WRITE_INTERVAL)
            await self.write_position()

    async def write_position(self) -> None:
        """Store the last settled event in the position bucket if it changed.

        A failure is logged at most once per POSITION_FAILURE_LOG_INTERVAL,
        and the next call tries again.
        """
        settled = self.last_settled
        if settled is None or settled == self.last_written:
            return
        try:
            await self.positions.write(self.config.stream, self.endpoint.name, settled)
        except NATS_ERRORS as error:
            now = asyncio.get_running_loop().time()
            logged = self.write_failed_logged_at
            if logged is None or now - logged >= POSITION_FAILURE_LOG_INTERVAL:
                self.write_failed_logged_at = now
                self.log.error(
                    "position_write_failed",
                    bucket=self.positions.bucket,
                    position=settled.position,
                    error=describe_nats_error(error),
                    note="retried every second; a consumer deleted while no "
                    "webhook runs resumes from the last position written",
                )
            return
        self.last_written = settled
        self.write_failed_logged_at = None

    async def _stored_resume(self) -> ResumePoint | None:
        """Return the point after the position in the bucket, or None when
        none is stored or the endpoint's ``start`` changed since."""
        stored = await self.positions.read(self.config.stream, self.endpoint.name)
        if stored is None:
            return None
        if stored.start != self.endpoint.start:
            self.log.info(
                "stored_position_ignored",
                consumer=self.endpoint.consumer_name,
                position=stored.position,
                stored_start=stored.start,
                start=self.endpoint.start,
                note="start changed since the position was stored, so a "
                "missing consumer is created at the new start",
            )
            return None
        if not await stored_position_fits(
            self.js,
            self.config.stream,
            self.config.subject_prefix,
            self.endpoint,
            stored,
        ):
            return None
        return ResumePoint(stored.position, stored=True)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        await self.dead_letters.ensure()
        await self._check_stream_subjects()
        resume: ResumePoint | None
        if self.had_consumer:
            resume = ResumePoint(self.handled_through)
        else:
            resume = await self._stored_resume()
        info, recreated = await ensure_consumer(
            self.js,
            self.config.stream,
            self.config.subject_prefix,
            self.endpoint,
            resume,
        )
        self.had_consumer = True
        if recreated:
            assert resume is not None
            self.handled_through = resume.position
            self.skip_through = resume.position
            self.skipped = 0
        elif self.handled_through is None:
            acknowledged = await acknowledged_position(
                self.js, self.config.stream, info
            )
            self.handled_through = acknowledged
            if resume is not None and (
                acknowledged is None or (resume.position or 0) > acknowledged
            ):
                # The last run settled events after the consumer's last
                # acknowledged one, such as events read from the feed
                # before a stop, or the consumer has acknowledged nothing.
                self.handled_through = resume.position
                self.skip_through = resume.position
                self.skipped = 0
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

    async def _check_stream_subjects(self) -> None:
        """Log a warning when the stream stores no subject under the subject
        prefix, once until that changes.

        The consumer has no subject filter, so deliveries go on. But the
        prefix is likely a typo or another registry's, and a consumer
        re-created after a deletion then finds no event by its position and
        reads the stream again from its first message.
        """
        info = await self.js.stream_info(self.config.stream)
        unstored = unstored_subject_error(
            self.config.stream,
            info.config.subjects or [],
            f"{self.config.subject_prefix}.>",
            self.config.subject_prefix,
            "[nats] subject_prefix",
        )
        if unstored is not None and not self.warned_unstored_subject:
            self.log.warning(
                "stream_subject_not_stored",
                stream=self.config.stream,
                subject_prefix=self.config.subject_prefix,
                error=unstored,
                note="deliveries go on, because the endpoint's consumer reads "
                "the whole stream",
            )
        self.warned_unstored_subject = unstored is not None

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
            await self._end_skip(message, position, client)
        if position is not None and self.handled_through is None:
            # The first event of a consumer that had handled nothing.
            self.handled_through = position - 1
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
        ids = _ids(event)
        prepared = await self._prepare(event, ids)
        if prepared is None:
            await self._ack(message)
            return

        failures = await self._failures_before(event["id"], message)
        if failures is not None and failures.attempts >= self.endpoint.max_attempts:
            # The last attempt failed, then the process stopped before it
            # recorded the dead letter, or max_attempts was lowered since.
            await self._dead_letter(
                message,
                prepared.received,
                failures.attempts,
                failures.status,
                failures.error,
                ids,
            )
            await self._forget_failures()
            return
        attempt = (failures.attempts if failures is not None else 0) + 1
        outcome = await self._attempt(prepared, client, attempt, message)

        if outcome.delivered:
            await self._ack(message)
            await self._forget_failures()
            self._log_delivered(ids, attempt, outcome)
            return
        await self._record_failure(event["id"], attempt, outcome)
        if attempt >= self.endpoint.max_attempts:
            await self._dead_letter(
                message, prepared.received, attempt, outcome.status, outcome.error, ids
            )
            await self._forget_failures()
            return
        delay = retry_delay(
            attempt, self.endpoint.backoff_initial, self.endpoint.backoff_max
        )
        await message.nak(delay=delay)
        self._log_failed(ids, attempt, outcome, delay)

    async def _failures_before(
        self, event_id: str, message: Msg
    ) -> FailedAttempts | None:
        """Return the failed attempts to deliver ``event_id`` so far, or None
        when there were none.

        The bucket is read only for a message that JetStream delivered
        before, so a first delivery costs no round trip to NATS.
        """
        if self.failures is not None and self.failures.event_id == event_id:
            return self.failures
        self.failures = None
        if (message.metadata.num_delivered or 1) <= 1:
            return None
        stored = await self.positions.read_failures(
            self.config.stream, self.endpoint.name
        )
        if stored is None or stored.event_id != event_id:
            return None
        self.failures = stored
        return stored

    async def _record_failure(
        self, event_id: str, attempt: int, outcome: Outcome
    ) -> None:
        """Store the failed ``attempt`` to deliver ``event_id``.

        A failed write is logged: this process keeps counting, but a restart
        would count the event's attempts from 1 again.
        """
        self.failures = FailedAttempts(event_id, attempt, outcome.status, outcome.error)
        try:
            await self.positions.write_failures(
                self.config.stream, self.endpoint.name, self.failures
            )
        except NATS_ERRORS as error:
            self.log.error(
                "attempt_write_failed",
                event_id=event_id,
                attempt=attempt,
                bucket=self.positions.bucket,
                error=describe_nats_error(error),
                note="a restart counts this event's attempts from 1 again",
            )

    async def _forget_failures(self) -> None:
        """Remove the stored failed attempts of the event just settled."""
        failures, self.failures = self.failures, None
        if failures is None:
            return
        try:
            await self.positions.delete_failures(self.config.stream, self.endpoint.name)
        except NATS_ERRORS as error:
            # A record left behind names its settled event, so only a
            # redelivery of that same event would read it.
            self.log.warning(
                "attempt_delete_failed",
                event_id=failures.event_id,
                bucket=self.positions.bucket,
                error=describe_nats_error(error),
            )

    async def _prepare(
        self, event: dict[str, Any], ids: dict[str, Any]
    ) -> Prepared | None:
        """Return what to send for ``event``, or None when this endpoint
        skips it without delivery."""
        if event["type"] not in EVENT_TYPES:
            self.log.warning(
                "event_type_unknown",
                **ids,
                note="published by a newer cairn; skipped without delivery",
            )
            return None
        if event["type"] == EventType.MANIFEST_PUSHED and self.lookup is not None:
            # Kept before the endpoint's filters, for the tag events that follow.
            self.lookup.remember(event)
        if not self.endpoint.accepts(event["type"], event["repository"]):
            return None
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
            return None
        facts = await self._facts(event)
        if self.endpoint.ignores_media_type(media_type_of(event, facts)):
            return None
        return Prepared(event, received, facts, fetch_error)

    async def _attempt(
        self,
        prepared: Prepared,
        client: httpx.AsyncClient,
        attempt: int,
        message: Msg,
    ) -> Outcome:
        """Send ``prepared`` once. ``message`` is the NATS message being
        handled, which a stop during the request hands back to JetStream."""
        if prepared.fetch_error is not None:
            return Outcome(False, None, prepared.fetch_error, 0.0)
        request = build_request(
            self.endpoint, prepared.event, self.config.registry_url, prepared.facts
        )
        try:
            return await send(client, self.endpoint, request, attempt)
        except asyncio.CancelledError:
            # Shutting down mid-request: hand the event back at once so
            # the next run delivers it without waiting for ack_wait.
            with contextlib.suppress(*NATS_ERRORS):
                await asyncio.shield(message.nak())
            raise

    def _log_delivered(
        self, ids: dict[str, Any], attempt: int, outcome: Outcome, **fields: Any
    ) -> None:
        self.log.info(
            "event_delivered",
            **ids,
            **fields,
            attempt=attempt,
            status=outcome.status,
            seconds=outcome.seconds,
        )

    def _log_failed(
        self,
        ids: dict[str, Any],
        attempt: int,
        outcome: Outcome,
        delay: float,
        **fields: Any,
    ) -> None:
        self.log.warning(
            "delivery_failed",
            **ids,
            **fields,
            attempt=attempt,
            max_attempts=self.endpoint.max_attempts,
            status=outcome.status,
            error=outcome.error,
            retry_in=round(delay, 2),
        )

    async def _end_skip(
        self, message: Msg, position: int, client: httpx.AsyncClient
    ) -> None:
        """Log the skipped events, then deliver the events that a re-created
        stream lacks before ``position``, the first event after those
        handled, or log them without ``[registry] url``.

        Log positions have no gaps and the consumer has no subject filter,
        so a jump means that the re-created stream lacks the events in
        between. The relay had published them before the stream was deleted,
        and it continued after them.
        """
        handled = self.skip_through
        assert handled is not None
        if self.skipped:
            self.log.info(
                "handled_events_skipped",
                consumer=self.endpoint.consumer_name,
                count=self.skipped,
                through_position=handled,
            )
            self.skipped = 0
        if position > handled + 1 and self.events is None:
            self.log.error(
                "events_missing_from_stream",
                consumer=self.endpoint.consumer_name,
                stream=self.config.stream,
                first_missing=handled + 1,
                last_missing=position - 1,
                note="these events are not in the re-created stream, so this "
                "endpoint does not receive them; read them from GET "
                f"/_cairn/events?after={handled}, or set [registry] url to "
                "make the webhook read and deliver them",
            )
        elif position > handled + 1:
            await self._deliver_missing(message, handled, position, client)
        self.skip_through = None

    async def _deliver_missing(
        self, message: Msg, handled: int, position: int, client: httpx.AsyncClient
    ) -> None:
        """Read the events after ``handled`` and before ``position`` from the
        registry's event feed and deliver them as events from NATS are.

        ``message`` carries the event at ``position``. It stays unacknowledged
        until this returns: a failed read is retried with the endpoint's
        backoff, and a stop hands it back to JetStream.
        """
        assert self.events is not None
        self.log.warning(
            "events_missing_from_stream",
            consumer=self.endpoint.consumer_name,
            stream=self.config.stream,
            first_missing=handled + 1,
            last_missing=position - 1,
            note="these events are not in the re-created stream, so they are "
            "read from the registry's event feed and delivered",
        )
        keeper = asyncio.create_task(self._keep_in_progress(message))
        try:
            await self._read_missing(message, handled, position, client)
        except asyncio.CancelledError:
            with contextlib.suppress(*NATS_ERRORS):
                await asyncio.shield(message.nak())
            raise
        finally:
            keeper.cancel()
        self.log.info(
            "missing_events_delivered",
            consumer=self.endpoint.consumer_name,
            first_missing=handled + 1,
            last_missing=position - 1,
        )

    async def _read_missing(
        self, message: Msg, handled: int, position: int, client: httpx.AsyncClient
    ) -> None:
        assert self.events is not None
        event_id = (message.headers or {}).get(EVENT_ID)
        same_log = event_id is None
        after = handled
        failures = 0
        while after < position - 1:
            try:
                if not same_log:
                    # The feed must carry this message's event at its
                    # position, or it serves another registry's log.
                    await self.events.event(position, str(event_id))
                    same_log = True
                events = await self.events.events_after(after, position - 1)
            except EventLookupFailed as error:
                failures += 1
                delay = retry_delay(
                    failures, self.endpoint.backoff_initial, self.endpoint.backoff_max
                )
                self.log.warning(
                    "missing_events_read_failed",
                    consumer=self.endpoint.consumer_name,
                    first_missing=after + 1,
                    last_missing=position - 1,
                    error=str(error),
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            for event in events:
                await self._deliver_from_feed(event, message, client)
                after = event["position"]
                self.skip_through = after

    async def _deliver_from_feed(
        self, event: dict[str, Any], message: Msg, client: httpx.AsyncClient
    ) -> None:
        """Deliver ``event`` with the endpoint's attempts and backoff, and
        record it as a dead letter once they are used up."""
        ids = _ids(event)
        prepared = await self._prepare(event, ids)
        attempt = 0
        while prepared is not None:
            attempt += 1
            outcome = await self._attempt(prepared, client, attempt, message)
            if outcome.delivered:
                self._log_delivered(ids, attempt, outcome, source="feed")
                break
            if attempt >= self.endpoint.max_attempts:
                await self.dead_letters.add(
                    self.endpoint.name,
                    prepared.received,
                    attempt,
                    outcome.status,
                    outcome.error,
                )
                self._log_dead_lettered(ids, attempt, outcome.status, outcome.error)
                break
            delay = retry_delay(
                attempt, self.endpoint.backoff_initial, self.endpoint.backoff_max
            )
            self._log_failed(ids, attempt, outcome, delay, source="feed")
            await asyncio.sleep(delay)
        self._settle(event["position"], event["id"])

    async def _keep_in_progress(self, message: Msg) -> None:
        """Tell JetStream every half ack wait that ``message`` is still being
        handled, so that it does not count another delivery."""
        while True:
            await asyncio.sleep(self.endpoint.ack_wait / 2)
            try:
                await message.in_progress()
            except NATS_ERRORS as error:
                self.log.warning(
                    "message_progress_failed",
                    consumer=self.endpoint.consumer_name,
                    error=describe_nats_error(error),
                    note="JetStream may deliver the message again",
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
            headers = message.headers or {}
            self._settle(position, headers.get(EVENT_ID), headers.get(REGISTRY_ID))

    def _settle(
        self, position: int, event_id: str | None, registry_id: str | None = None
    ) -> None:
        """Record the event at ``position`` as handled, for a re-created
        consumer and for the position bucket.

        An event read from the feed has no message header, and keeps the
        registry id of the events before it.
        """
        self.handled_through = position
        if registry_id is None and self.last_settled is not None:
            registry_id = self.last_settled.registry_id
        if event_id is not None:
            self.last_settled = StoredPosition(
                position, event_id, self.endpoint.start, registry_id
            )

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
        self._log_dead_lettered(ids, attempts, status, error)

    def _log_dead_lettered(
        self,
        ids: dict[str, Any],
        attempts: int,
        status: int | None,
        error: str | None,
    ) -> None:
        self.log.error(
            "event_dead_lettered",
            **ids,
            attempts=attempts,
            status=status,
            error=error,
            stream=self.dead_letters.stream,
        )


@dataclass(frozen=True, slots=True)
class Prepared:
    """An event to send: as received (a stand-in stays one) and as sent,
    the tag's manifest facts, and why reading a stand-in's event failed."""

    event: dict[str, Any]
    received: dict[str, Any]
    facts: ManifestFacts | None
    fetch_error: str | None


def _ids(event: dict[str, Any]) -> dict[str, Any]:
    """Return the fields that name ``event`` in log lines."""
    return {
        "event_id": event["id"],
        "position": event.get("position"),
        "type": event["type"],
        "repository": event["repository"],
    }


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
