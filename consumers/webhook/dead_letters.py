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
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from engine.domain.events import format_time

log = structlog.get_logger(__name__)

MSG_ID: Final = "Nats-Msg-Id"
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
    def __init__(self, js: JetStreamContext, stream: str, prefix: str) -> None:
        self.js = js
        self.stream = stream
        self.prefix = prefix

    def subject(self, endpoint: str | None = None) -> str:
        return f"{self.prefix}.{endpoint}" if endpoint else f"{self.prefix}.>"

    async def ensure(self) -> None:
        """Create the stream unless it exists; an existing one is left as it is."""
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
        body = {
            "endpoint": endpoint,
            "attempts": attempts,
            "status": status,
            "error": error,
            "failed_at": format_time(datetime.now(UTC)),
            "event": event,
        }
        await self.js.publish(
            self.subject(endpoint),
            json.dumps(body, separators=(",", ":")).encode(),
            stream=self.stream,
            headers={MSG_ID: f"{endpoint}:{event.get('id')}"},
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
