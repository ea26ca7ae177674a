"""Dead letters: events an endpoint did not accept within its attempts.

They are kept in a JetStream stream of their own (default
``CAIRN_WEBHOOK_DEAD_LETTERS``, file storage), one message per event and
endpoint on ``<prefix>.<endpoint name>``. They are in a stream, not a local
file, because a stream survives the loss of the webhook's host. Every host
that runs `cairn webhook`, and an operator's shell, reads the same records,
and removing a record after a successful redelivery is one ``delete_msg``.

Each message carries ``Nats-Msg-Id: <endpoint>:<event id>``, so that a
webhook that crashes after recording a dead letter but before terminating
the original message records it once, not twice, when it runs again within
the stream's duplicate window.

An event that fits in a message of the event stream can be too large once
the dead-letter fields are added around it. Its dead letter then keeps the
event as a stand-in without the payload, in the form the relay sends
(``engine.bus.messages.stand_in_message``), and redelivery reads the full
event from the registry's event feed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from consumers.webhook.payloads import event_problem
from engine.bus.messages import message_size
from engine.domain.events import format_time

log = structlog.get_logger(__name__)

MSG_ID: Final = "Nats-Msg-Id"
EXPECTED_STREAM: Final = "Nats-Expected-Stream"
DUPLICATE_WINDOW: Final = 120.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One recorded failure; ``sequence`` is its place in the stream.

    ``problem`` describes a stored record that is not a valid dead letter,
    such as one whose event lacks its time. Such a record is listed with
    its problem and never redelivered, and its other fields are whatever
    could be read from it.
    """

    sequence: int
    endpoint: str
    event: dict[str, Any]
    attempts: int
    status: int | None
    error: str | None
    failed_at: str
    problem: str | None = None

    @property
    def event_id(self) -> str:
        return str(self.event.get("id", ""))

    def to_json(self) -> dict[str, Any]:
        document = {
            "sequence": self.sequence,
            "endpoint": self.endpoint,
            "attempts": self.attempts,
            "status": self.status,
            "error": self.error,
            "failed_at": self.failed_at,
            "event": self.event,
        }
        if self.problem is not None:
            document["problem"] = self.problem
        return document


class DeadLetterStore:
    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        prefix: str,
        max_payload: Callable[[], int] | None = None,
    ) -> None:
        self.js = js
        self.stream = stream
        self.prefix = prefix
        # Returns the connected server's max_payload in bytes, read at each
        # add. None for a store that only lists and removes.
        self.max_payload = max_payload
        # Workers of several endpoints share one store and call ensure() at
        # once; the lock lets one create the stream and the others find it.
        self._ensuring = asyncio.Lock()

    def subject(self, endpoint: str | None = None) -> str:
        return f"{self.prefix}.{endpoint}" if endpoint else f"{self.prefix}.>"

    async def ensure(self) -> None:
        """Create the stream unless it exists; an existing one is left as it is."""
        async with self._ensuring:
            await self._ensure()

    async def _ensure(self) -> None:
        try:
            await self.js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        await self.js.add_stream(
            StreamConfig(
                name=self.stream,
                subjects=[self.subject()],
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW,
                description="cairn webhook events that no attempt delivered",
            )
        )
        log.info("dead_letter_stream_created", stream=self.stream)

    async def add(
        self,
        endpoint: str,
        event: dict[str, Any],
        attempts: int,
        status: int | None,
        error: str | None,
    ) -> None:
        """Record a dead letter and wait until JetStream has stored it."""
        document = {
            "endpoint": endpoint,
            "attempts": attempts,
            "status": status,
            "error": error,
            "failed_at": format_time(datetime.now(UTC)),
            "event": event,
        }
        headers = {MSG_ID: f"{endpoint}:{event.get('id')}"}
        body = _encode(document)
        # js.publish adds this header, which counts against max_payload too.
        sent_headers = {**headers, EXPECTED_STREAM: self.stream}
        limit = self.max_payload() if self.max_payload is not None else None
        if limit is not None and message_size(body, sent_headers) > limit:
            document["event"] = {**event, "payload": None, "payload_omitted": True}
            body = _encode(document)
            log.warning(
                "dead_letter_payload_omitted",
                endpoint=endpoint,
                event_id=event.get("id"),
                position=event.get("position"),
                limit=limit,
                note="the dead letter keeps the event without its payload; "
                "redelivery reads it from the registry's event feed",
            )
        await self.js.publish(
            self.subject(endpoint), body, stream=self.stream, headers=headers
        )

    async def list(self, endpoint: str | None = None) -> AsyncIterator[DeadLetter]:
        """Yield the stored dead letters in the order they were recorded."""
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return
        sequence = max(info.state.first_seq, 1)
        subject = self.subject(endpoint)
        while sequence <= info.state.last_seq:
            try:
                message = await self.js.get_msg(
                    self.stream, sequence, subject=subject, next=True
                )
            except nats.js.errors.NotFoundError:
                return
            found = message.seq or sequence
            endpoint = (message.subject or "").removeprefix(self.prefix + ".")
            letter = _decode(found, endpoint, message.data or b"")
            if letter.problem is not None:
                log.warning(
                    "dead_letter_invalid",
                    stream=self.stream,
                    sequence=found,
                    endpoint=endpoint,
                    problem=letter.problem,
                    note="listed with its problem and never redelivered",
                )
            yield letter
            sequence = found + 1

    async def remove(self, sequence: int) -> None:
        await self.js.delete_msg(self.stream, sequence)


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _decode(sequence: int, endpoint: str, data: bytes) -> DeadLetter:
    """Decode a stored record, setting ``problem`` when it is not valid.

    ``endpoint`` is the one that the record's subject names. An invalid
    record is given that endpoint, because listing by endpoint filters
    on the subject.
    """
    try:
        body = json.loads(data)
    except ValueError as error:
        return _invalid(sequence, endpoint, {}, f"the record is not JSON: {error}")
    if not isinstance(body, dict):
        return _invalid(
            sequence, endpoint, {}, f"the record is {body!r}, expected a JSON object"
        )
    problem = _record_problem(body)
    if problem is not None:
        return _invalid(sequence, endpoint, body, problem)
    return DeadLetter(
        sequence=sequence,
        endpoint=body["endpoint"],
        event=body["event"],
        attempts=body["attempts"],
        status=body.get("status"),
        error=body.get("error"),
        failed_at=body["failed_at"],
    )


def _record_problem(body: dict[str, Any]) -> str | None:
    """Describe the first field of ``body`` that add() never writes, or return None."""
    for key in ("endpoint", "failed_at", "attempts", "event"):
        if key not in body:
            return f"field {key!r} is missing"
    checks = [
        ("endpoint", isinstance(body["endpoint"], str), "a string"),
        ("failed_at", isinstance(body["failed_at"], str), "a string"),
        ("attempts", _is_count(body["attempts"]), "a whole number, 0 or more"),
        ("status", _is_int_or_none(body.get("status")), "an HTTP status or null"),
        ("error", isinstance(body.get("error"), str | None), "a string or null"),
    ]
    for key, valid, expected in checks:
        if not valid:
            return f"field {key!r} is {body[key]!r}, expected {expected}"
    return event_problem(body["event"])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_int_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _invalid(
    sequence: int, endpoint: str, body: dict[str, Any], problem: str
) -> DeadLetter:
    event = body.get("event")
    failed_at = body.get("failed_at")
    return DeadLetter(
        sequence=sequence,
        endpoint=endpoint,
        event=event if isinstance(event, dict) else {},
        attempts=0,
        status=None,
        error=None,
        failed_at=failed_at if isinstance(failed_at, str) else "",
        problem=problem,
    )
