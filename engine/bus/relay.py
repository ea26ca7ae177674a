"""The relay: a transactional outbox from the SQL log to a JetStream stream.

The relay reads events after its checkpoint, publishes them, waits for
JetStream's acknowledgements and then advances the checkpoint. It runs as a
task beside the HTTP server and never in a request, so pushes keep their
latency whatever NATS does. While NATS is away, the backlog waits in the log.

The checkpoint row is written by a task of its own, at most once per
``checkpoint_interval``, with the last acknowledged position. Publishing
never waits for that write: on SQLite it competes with pushes for the
database's single write lock, and a write per batch made both slow.

Each election claims a new generation of the checkpoint row, and every
write of the relay is conditional on the row still having it (see
``engine.bus.checkpoint``). A leader whose lock session died may not notice
before its next check, and meanwhile `cairn events republish` or a new
leader can take the lock. When such a relay's write finds a newer
generation, the relay logs ``relay_checkpoint_fenced``, stops publishing,
and stands for election again, which reads the checkpoint afresh.

Every event reaches the stream once and in log order because of three rules:

1. Reconcile before publishing. On each connection, and after any failure,
   the relay reads the stream's last message. When that message carries the
   position and id of an event in the log, publishing resumes right after
   it: the checkpoint is moved forward if the relay died between the
   acknowledgement and the checkpoint write (however long ago, so the
   duplicate window does not matter), and back if the NATS server lost
   acknowledged messages. Only when the last message is not a known event
   (an empty or purged stream, or a message from another publisher) does
   the checkpoint alone decide. A last message whose ``Cairn-Registry-Id``
   names another registry is logged at error level, because two registries
   then share the stream.
2. Chain the publishes. A window of up to ``batch_size`` events is sent
   without waiting, each with ``Nats-Expected-Last-Sequence`` set to the
   sequence the stream must end at just before it. JetStream stores a
   message only if the stream ends exactly there, so when one message of a
   window fails every later one fails too, and the stream never gets a gap
   or a reordering. A second relay that wrongly believes it leads cannot
   interleave its messages either.
3. Deduplicate by id. Each message has ``Nats-Msg-Id`` set to the event id,
   so a message re-sent within the duplicate window is acknowledged as a
   duplicate and not stored again.

An event whose message is larger than the server's max_payload or the
stream's max_msg_size would fail on every attempt and stop the relay, so
it goes out as a stand-in of the same subject, position and id, with its
payload left out (see ``stand_in_message``), and a warning is logged.
Consumers read the full event from ``GET /_cairn/events``.

One process at a time runs the relay; see ``engine.bus.leader``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from engine.bus import checkpoint as store
from engine.bus.connection import CONNECTION_ERRORS, NatsLink, describe_nats_error
from engine.bus.leader import Leadership
from engine.bus.messages import (
    EXPECTED_LAST_SEQUENCE,
    event_message,
    message_size,
    stand_in_message,
)
from engine.bus.publisher import AckPublisher
from engine.bus.retry import Backoff, Throttle
from engine.bus.settings import BusSettings
from engine.bus.stream import StreamTail, ensure_stream, read_tail
from engine.db import Database
from engine.domain.events import StoredEvent
from engine.identity import load_registry_id

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Called with each acknowledged batch, before the checkpoint covers it.
BatchHook = Callable[[list[StoredEvent]], None]


class PublishFailed(Exception):
    """Publishing the event at ``position`` failed with ``error``."""

    def __init__(self, event: StoredEvent, error: BaseException) -> None:
        super().__init__(f"publishing position {event.position} failed: {error}")
        self.position = event.position
        self.event_id = str(event.id)
        self.error = error


class StandInTooLarge(Exception):
    """Even the stand-in of an event is larger than the message size limit."""


# The advice, in the relay's logs, for registries that publish to one stream.
_RESTORED_HINT = (
    "the stream keeps the events that the restore undid, and new events reuse "
    "their positions; to publish one history, stop cairn serve, delete the "
    "stream (for the embedded NATS server, the data directory's "
    "nats/jetstream), and run `cairn events republish --from 1`"
)
_SHARED_STREAM_HINT = (
    "give each registry its own --stream or --subject-prefix, because "
    "subscribers that do not read the Cairn-Registry-Id header cannot tell "
    "their events apart"
)

RELAY_ERRORS = (*CONNECTION_ERRORS, sa.exc.SQLAlchemyError, PublishFailed)
DATABASE_ERRORS = (sa.exc.SQLAlchemyError, OSError)


@dataclass(slots=True)
class _Outcome:
    acked: list[StoredEvent]
    last_sequence: int
    duplicate: bool = False
    error: PublishFailed | None = None


class Relay:
    """Publishes the log to the stream while this process is the leader."""

    def __init__(
        self,
        database: Database,
        link: NatsLink,
        leadership: Leadership,
        settings: BusSettings,
        *,
        on_batch_acked: BatchHook | None = None,
    ) -> None:
        self._database = database
        self._link = link
        self._leadership = leadership
        self._settings = settings
        self._name = settings.relay_name
        self._on_batch_acked = on_batch_acked
        self._wake = asyncio.Event()
        self._backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self._failures = Throttle(settings.log_interval)
        self._unknown_tail = Throttle(settings.log_interval)
        self._published_since_behind: int | None = 0
        self._acked = asyncio.Event()
        # As leader: the last position JetStream acknowledged, and the last
        # position written to the checkpoint row.
        self._acked_position: int | None = None
        self._saved: int | None = None
        # The generation claimed at the last election, or None before the
        # first one and after a write found a newer one. While ``_fenced``
        # is set, the publishing loop steps down.
        self._generation: int | None = None
        self._fenced = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # The largest message in bytes, headers included, that the connected
        # server and the stream accept. It is set on each connection.
        self._max_message_size = 0
        # The id of the registry whose log this is, read before the first
        # publish. Every message carries it.
        self._registry_id: str | None = None
        self._save_lock = threading.Lock()
        self.leader = False
        # The leader's last acknowledged position; a standby's last read of
        # the checkpoint row.
        self.checkpoint: int | None = None
        self.head: int | None = None
        self.oldest_pending: datetime | None = None
        self.last_error: str | None = None

    # ---- called from the event loop by the Bus ---------------------------

    def note_appended(self, events: list[StoredEvent]) -> None:
        """Record events that were just committed and wake the relay."""
        if events:
            last = events[-1].position
            if self.head is None or last > self.head:
                if self.oldest_pending is None:
                    self.oldest_pending = events[0].time
                self.head = last
        self._wake.set()

    def release_leadership(self) -> None:
        """Give up leadership; blocks, so call it from a worker thread."""
        self._leadership.release()

    @property
    def lag_events(self) -> int | None:
        if self.head is None or self.checkpoint is None:
            return None
        return max(0, self.head - self.checkpoint)

    async def run(self) -> None:
        """Elect, publish, and on losing leadership start over, until cancelled."""
        log.info("relay_started", relay=self._name, stream=self._settings.stream)
        self._loop = asyncio.get_running_loop()
        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        saver = asyncio.create_task(self._save_checkpoints(), name="cairn-checkpoint")
        try:
            await self._run(backoff)
        finally:
            saver.cancel()

    async def _run(self, backoff: Backoff) -> None:
        while True:
            try:
                await self._acquire_leadership()
                try:
                    await self._lead()
                finally:
                    self.leader = False
                backoff.reset()
            except Exception as error:
                # A bug or an event the relay cannot encode: log it, keep the
                # backlog in the log, and try again rather than stop for good.
                self.last_error = str(error) or type(error).__name__
                delay = backoff.next_delay()
                log.exception(
                    "relay_crashed",
                    relay=self._name,
                    position=(self.checkpoint or 0) + 1,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
            await asyncio.to_thread(self._leadership.release)

    # ---- leadership ------------------------------------------------------

    async def _acquire_leadership(self) -> None:
        throttle = Throttle(self._settings.log_interval)
        announced = False
        while True:
            try:
                if await asyncio.to_thread(self._leadership.try_acquire):
                    await asyncio.to_thread(self._claim_checkpoint)
                    self.leader = True
                    self.last_error = None
                    log.info(
                        "relay_leader_elected",
                        relay=self._name,
                        pid=os.getpid(),
                        checkpoint=self.checkpoint,
                        generation=self._generation,
                    )
                    return
            except DATABASE_ERRORS as error:
                # Shown by /_cairn/health, because no relay publishes while
                # the lock fails in every process.
                self.last_error = f"relay lock failed: {error}"
                if throttle.ready() is not None:
                    log.warning("relay_lock_failed", relay=self._name, error=str(error))
            else:
                if not announced:
                    log.info(
                        "relay_standby",
                        relay=self._name,
                        retry_in=self._settings.leader_retry,
                    )
                    announced = True
            await self._refresh_progress()
            await asyncio.sleep(self._settings.leader_retry)

    async def _still_leader(self) -> bool:
        if self._fenced:
            # _step_down has logged relay_checkpoint_fenced with the reason.
            return False
        if await asyncio.to_thread(self._leadership.check):
            return True
        log.warning("relay_leadership_lost", relay=self._name)
        return False

    async def _lead(self) -> None:
        while True:
            client = await self._wait_connected()
            if client is None:
                return
            closed = self._link.closed
            assert closed is not None
            try:
                if await self._publish_while_connected(client, closed):
                    return
            except RELAY_ERRORS as error:
                if client.is_closed:
                    # The link logs the disconnection and reconnects.
                    continue
                delay = self._backoff.next_delay()
                self._report_failure(error, delay)
                await asyncio.sleep(delay)

    async def _wait_connected(self) -> Client | None:
        """Wait for NATS, keeping the progress fresh; None on lost leadership."""
        while True:
            client = await self._link.wait_connected(self._settings.poll_interval)
            if client is not None:
                return client
            await self._refresh_progress()
            if not await self._still_leader():
                return None

    # ---- publishing ------------------------------------------------------

    async def _publish_while_connected(
        self, client: Client, closed: asyncio.Future[None]
    ) -> bool:
        """Publish until the connection closes; return True on lost leadership."""
        settings = self._settings
        if self._registry_id is None:
            self._registry_id = await asyncio.to_thread(
                load_registry_id, self._database
            )
        js = client.jetstream(timeout=settings.ack_timeout)
        stream = await ensure_stream(
            js, settings.stream, settings.subject_prefix, settings.duplicate_window
        )
        self._max_message_size = client.max_payload
        if stream.max_msg_size is not None and stream.max_msg_size > 0:
            self._max_message_size = min(client.max_payload, stream.max_msg_size)
        expected = await self._reconcile(js)
        self._published_since_behind = 0
        publisher = AckPublisher(client)
        await publisher.start()
        try:
            return await self._publish_loop(js, publisher, closed, expected)
        finally:
            await publisher.close()

    async def _publish_loop(
        self,
        js: JetStreamContext,
        publisher: AckPublisher,
        closed: asyncio.Future[None],
        expected: int,
    ) -> bool:
        """Publish pending events until the connection closes; return True
        on lost leadership."""
        settings = self._settings
        next_check = time.monotonic() + settings.poll_interval

        while not closed.done():
            if self._fenced or time.monotonic() >= next_check:
                if not await self._still_leader():
                    return True
                next_check = time.monotonic() + settings.poll_interval

            self._wake.clear()
            head, events = await self._read(
                store.read_pending, self.checkpoint, settings.batch_size
            )
            # On PostgreSQL the two reads of read_pending are separate
            # snapshots, so the events may end after the head it read.
            if events:
                head = max(head, events[-1].position)
            self.head = max(head, self.head or 0)
            if not events:
                self.oldest_pending = None
                self._note_caught_up()
                await self._wait_for_work(closed)
                continue
            self.oldest_pending = events[0].time

            outcome = await self._publish(publisher, closed, events, expected)
            if outcome.acked:
                self._note_acked(outcome.acked)
            if outcome.error is not None:
                raise outcome.error
            if outcome.duplicate:
                log.info(
                    "relay_duplicate_dropped",
                    relay=self._name,
                    position=outcome.acked[-1].position,
                    event_id=str(outcome.acked[-1].id),
                )
                expected = await self._reconcile(js)
            else:
                expected = outcome.last_sequence
            self._backoff.reset()
            self._failures.reset()
            self.last_error = None
        return False

    async def _publish(
        self,
        publisher: AckPublisher,
        closed: asyncio.Future[None],
        events: list[StoredEvent],
        expected: int,
    ) -> _Outcome:
        """Send ``events`` as one window, then take the acks in log order."""
        futures: list[asyncio.Future[PubAck]] = []
        acked: list[StoredEvent] = []
        last_sequence = expected
        try:
            for offset, event in enumerate(events):
                subject, body, headers = self._message(event, expected + offset)
                futures.append(await publisher.publish(subject, body, headers))
            for event, future in zip(events, futures, strict=True):
                ack = await self._await_ack(future, closed)
                acked.append(event)
                if ack.duplicate:
                    return _Outcome(acked, last_sequence, duplicate=True)
                last_sequence = ack.seq
        except (*CONNECTION_ERRORS, StandInTooLarge) as error:
            # The failed event is the one being sent, or else the first one
            # not acknowledged.
            failed = len(futures) if len(futures) < len(events) else len(acked)
            return _Outcome(
                acked, last_sequence, error=PublishFailed(events[failed], error)
            )
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
        return _Outcome(acked, last_sequence)

    def _message(
        self, event: StoredEvent, expected_last_sequence: int
    ) -> tuple[str, bytes, dict[str, str]]:
        """Return the subject, body and headers to publish ``event`` with.

        Returns the stand-in when the event's message exceeds the size limit.
        Raises StandInTooLarge when the stand-in exceeds it too.
        """
        prefix = self._settings.subject_prefix
        registry_id = self._registry_id
        assert registry_id is not None, "read before the first publish"
        subject, body, headers = event_message(prefix, event, registry_id)
        headers[EXPECTED_LAST_SEQUENCE] = str(expected_last_sequence)
        size = message_size(body, headers)
        limit = self._max_message_size
        if size <= limit:
            return subject, body, headers

        subject, body, headers = stand_in_message(prefix, event, registry_id)
        headers[EXPECTED_LAST_SEQUENCE] = str(expected_last_sequence)
        stand_in_size = message_size(body, headers)
        if stand_in_size > limit:
            raise StandInTooLarge(
                f"the event's message is {size} bytes and even its stand-in "
                f"without the payload is {stand_in_size} bytes, above the limit "
                f"of {limit} bytes: raise max_payload on the NATS server or "
                "max_msg_size on the stream"
            )
        log.warning(
            "relay_payload_omitted",
            relay=self._name,
            position=event.position,
            event_id=str(event.id),
            type=str(event.type),
            repository=event.repository,
            size=size,
            limit=limit,
            note="published a stand-in without the payload; consumers read "
            "the event from GET /_cairn/events",
        )
        return subject, body, headers

    async def _await_ack(
        self, future: asyncio.Future[PubAck], closed: asyncio.Future[None]
    ) -> PubAck:
        if not future.done():
            waiting: set[asyncio.Future[Any]] = {future, closed}
            await asyncio.wait(
                waiting,
                timeout=self._settings.ack_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if future.done():
            return future.result()
        if closed.done():
            raise ConnectionError("NATS connection closed before the ack arrived")
        raise TimeoutError(f"no ack within {self._settings.ack_timeout} s")

    def _note_acked(self, acked: list[StoredEvent]) -> None:
        if self._on_batch_acked is not None:
            self._on_batch_acked(acked)
        self.checkpoint = self._acked_position = acked[-1].position
        self._acked.set()
        if (
            self._published_since_behind is None
            and len(acked) == self._settings.batch_size
        ):
            # A full window means a backlog, so relay_caught_up is logged
            # once it is published.
            self._published_since_behind = 0
        if self._published_since_behind is not None:
            self._published_since_behind += len(acked)

    def _note_caught_up(self) -> None:
        if self._published_since_behind is None:
            return
        log.info(
            "relay_caught_up",
            relay=self._name,
            position=self.checkpoint,
            published=self._published_since_behind,
        )
        self._published_since_behind = None

    async def _wait_for_work(self, closed: asyncio.Future[None]) -> None:
        """Wait for an append, the poll interval, or the connection to close."""
        woken = asyncio.ensure_future(self._wake.wait())
        waiting: set[asyncio.Future[Any]] = {woken, closed}
        try:
            await asyncio.wait(
                waiting,
                timeout=self._settings.poll_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            woken.cancel()

    async def _reconcile(self, js: JetStreamContext) -> int:
        """Resume after the stream's last message if it is a known event.

        Returns the stream's last sequence, which the next publish expects.
        """
        tail = await read_tail(js, self._settings.stream)
        checkpoint = self.checkpoint or 0
        if tail.position is not None and tail.event_id is not None:
            known_id = await self._read(store.event_id_at, tail.position)
            if known_id is not None and str(known_id) == tail.event_id:
                if tail.position > checkpoint:
                    log.info(
                        "relay_checkpoint_advanced",
                        relay=self._name,
                        checkpoint=checkpoint,
                        position=tail.position,
                        reason="the stream already holds these events",
                    )
                    self.checkpoint = self._acked_position = tail.position
                    self._acked.set()
                elif tail.position < checkpoint:
                    log.warning(
                        "relay_stream_behind_checkpoint",
                        relay=self._name,
                        checkpoint=checkpoint,
                        position=tail.position,
                        reason="the stream lost acknowledged events; "
                        "publishing them again",
                    )
                    await asyncio.to_thread(self._rewind_checkpoint, tail.position)
                return tail.last_sequence
        if (
            tail.last_sequence
            and (suppressed := self._unknown_tail.ready()) is not None
        ):
            self._report_unknown_tail(tail, checkpoint, suppressed)
        return tail.last_sequence

    # ---- reporting -------------------------------------------------------

    def _report_unknown_tail(
        self, tail: StreamTail, checkpoint: int, suppressed: int
    ) -> None:
        """Log that the stream's last message is not an event of this log, at
        error level when it names another registry."""
        fields: dict[str, Any] = {
            "relay": self._name,
            "stream": self._settings.stream,
            "sequence": tail.last_sequence,
            "position": tail.position,
            "event_id": tail.event_id,
            "checkpoint": checkpoint,
            "suppressed": suppressed,
        }
        if tail.registry_id is not None and tail.registry_id != self._registry_id:
            log.error(
                "relay_stream_tail_other_registry",
                registry_id=self._registry_id,
                other_registry_id=tail.registry_id,
                reason="the last message is an event of another registry; "
                "resuming from the checkpoint",
                hint=_SHARED_STREAM_HINT,
                **fields,
            )
            return
        if tail.registry_id is not None:
            # This registry's event that its log lacks: the database was
            # restored from a backup older than the event.
            log.warning(
                "relay_stream_tail_unknown",
                reason="the last message is an event of this registry that "
                "its log does not contain, as after a restore of the database "
                "from an older backup; resuming from the checkpoint",
                hint=_RESTORED_HINT,
                **fields,
            )
            return
        log.warning(
            "relay_stream_tail_unknown",
            reason="the last message is not an event of this log; "
            "resuming from the checkpoint",
            hint=f"if another registry publishes to this stream, {_SHARED_STREAM_HINT}",
            **fields,
        )

    def _report_failure(self, error: BaseException, delay: float) -> None:
        self.last_error = describe_nats_error(error, self._link.client)
        suppressed = self._failures.ready()
        if suppressed is None:
            return
        fields: dict[str, Any] = {
            "relay": self._name,
            "error": self.last_error,
            "attempt": self._backoff.attempt,
            "retry_in": round(delay, 2),
            "suppressed": suppressed,
        }
        if isinstance(error, PublishFailed):
            fields.update(position=error.position, event_id=error.event_id)
        if isinstance(error, sa.exc.SQLAlchemyError):
            log.warning("relay_database_failed", **fields)
        else:
            log.warning("relay_publish_failed", **fields)

    async def _refresh_progress(self) -> None:
        """Read the log head and the oldest unpublished event for ``health()``.

        A standby also reads the checkpoint row; the leader keeps its own
        position, which may be ahead of the row.
        """
        after = self.checkpoint if self.leader else None
        try:
            progress = await self._read(store.read_progress, self._name, after)
        except DATABASE_ERRORS as error:
            log.debug("relay_progress_unavailable", relay=self._name, error=str(error))
            return
        self.checkpoint = progress.checkpoint
        self.head = progress.head
        self.oldest_pending = progress.oldest_pending

    # ---- the checkpoint row ----------------------------------------------

    async def _save_checkpoints(self) -> None:
        """Write the acknowledged position to the checkpoint row as it moves."""
        backoff = Backoff(self._settings.backoff_initial, self._settings.backoff_max)
        throttle = Throttle(self._settings.log_interval)
        while True:
            await self._acked.wait()
            self._acked.clear()
            try:
                await asyncio.to_thread(self.save_checkpoint)
            except DATABASE_ERRORS as error:
                self._acked.set()
                delay = backoff.next_delay()
                if (suppressed := throttle.ready()) is not None:
                    log.warning(
                        "relay_database_failed",
                        relay=self._name,
                        error=str(error),
                        position=self.checkpoint,
                        retry_in=round(delay, 2),
                        suppressed=suppressed,
                    )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            await asyncio.sleep(self._settings.checkpoint_interval)

    def save_checkpoint(self) -> None:
        """Write the acknowledged position if the row is behind it; blocks.

        Writes nothing once the row has a newer generation than the one this
        relay claimed. The relay then logs ``relay_checkpoint_fenced`` and
        steps down.
        """
        with self._save_lock:
            position = self._acked_position
            generation = self._generation
            if position is None or generation is None:
                return
            if self._saved is not None and position <= self._saved:
                return
            # A checkpoint that a power cut takes back costs no duplicate:
            # on connect the relay resumes after the stream's last event.
            try:
                with self._database.transaction(durable=False) as conn:
                    store.advance_checkpoint(conn, self._name, position, generation)
            except store.CheckpointFenced as fenced:
                self._step_down(fenced, position)
                return
            self._saved = position

    def _rewind_checkpoint(self, position: int) -> None:
        with self._save_lock:
            generation = self._generation
            if generation is None:
                return
            try:
                with self._database.transaction() as conn:
                    store.rewind_checkpoint(conn, self._name, position, generation)
            except store.CheckpointFenced as fenced:
                self._step_down(fenced, position)
                return
            self.checkpoint = self._acked_position = self._saved = position

    def _claim_checkpoint(self) -> None:
        """Start a new generation of the checkpoint row and take its position."""
        with self._save_lock:
            with self._database.transaction() as conn:
                claim = store.claim_checkpoint(conn, self._name)
            self._generation = claim.generation
            self._fenced = False
            self.checkpoint = self._acked_position = self._saved = claim.position

    def _step_down(self, fenced: store.CheckpointFenced, position: int) -> None:
        """Stop writing, and make the publishing loop give up leadership.

        Runs in a worker thread, with ``_save_lock`` held.
        """
        log.warning(
            "relay_checkpoint_fenced",
            relay=self._name,
            generation=fenced.generation,
            row_generation=fenced.current,
            position=position,
            reason="another relay became the leader or the checkpoint was "
            "reset; stepping down",
        )
        self._generation = None
        self._fenced = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    # ---- database access in worker threads -------------------------------

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._run_read, function, *args)

    def _run_read(self, function: Callable[..., T], *args: Any) -> T:
        with self._database.read() as conn:
            return function(conn, *args)
