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

from engine.bus.messages import message_size
from engine.domain.events import format_time

log = structlog.get_logger(__name__)

MSG_ID: Final = "Nats-Msg-Id"
EXPECTED_STREAM: Final = "Nats-Expected-Stream"
DUPLICATE_WINDOW: Final = 120.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One recorded failure; ``sequence`` is its place in the stream."""

    sequence: int
    endpoint: str
    event: dict[str, Any]
    attempts: int
    status: int | None
    error: str | None
    failed_at: str

    @property
    def event_id(self) -> str:
        return str(self.event.get("id", ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "endpoint": self.endpoint,
            "attempts": self.attempts,
            "status": self.status,
            "error": self.error,
            "failed_at": self.failed_at,
            "event": self.event,
        }


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
            yield _decode(found, message.data or b"")
            sequence = found + 1

    async def remove(self, sequence: int) -> None:
        await self.js.delete_msg(self.stream, sequence)


def _encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _decode(sequence: int, data: bytes) -> DeadLetter:
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    return DeadLetter(
        sequence=sequence,
        endpoint=str(body.get("endpoint", "")),
        event=body.get("event") or {},
        attempts=int(body.get("attempts") or 0),
        status=body.get("status"),
        error=body.get("error"),
        failed_at=str(body.get("failed_at", "")),
    )
