"""Each endpoint's last handled position, kept in a JetStream key-value bucket.

JetStream keeps an endpoint's place in its durable consumer, but deleting
the stream deletes the consumer too. A worker that is running at that moment
re-creates the consumer after the last position it handled, and a webhook
that starts later reads that position here. The bucket
(``CAIRN_WEBHOOK_POSITIONS``, file storage, one revision per key) lives on
the NATS server beside the dead-letter stream, so it survives the loss of
the webhook's host.

The bucket also keeps, under ``<event stream>.<endpoint name>.failure``,
the failed attempts of the event that an endpoint is retrying: how many
there were and the last one's status or error. JetStream also counts a
delivery whose attempt the webhook's own stop cut off. So the attempt
number and a dead letter's failure come from this record, and a restart
makes the cut-off attempt again.

A bucket deleted while the webhook runs, for example with the NATS
server's store, is created again at the next write.

The key is ``<event stream>.<endpoint name>``, as the consumer belongs to
the stream. The value is JSON: the position, the id of the event at that
position, the endpoint's ``start`` when it was written, and the id of the
registry that published that event. The event id
shows whether a stream that carries the position still carries the same
log.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Final

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

log = structlog.get_logger(__name__)

DEFAULT_BUCKET: Final = "CAIRN_WEBHOOK_POSITIONS"


@dataclass(frozen=True, slots=True)
class StoredPosition:
    """The last position an endpoint handled and the id of the event there.

    ``start`` is the endpoint's ``start`` setting when this was written.
    ``registry_id`` is the id of the registry that published the event, None
    when its message had no Cairn-Registry-Id header.
    """

    position: int
    event_id: str
    start: str
    registry_id: str | None = None


@dataclass(frozen=True, slots=True)
class FailedAttempts:
    """The failed attempts to deliver one event to an endpoint.

    ``attempts`` counts the attempts that got a non-2xx response or failed
    with an error, and ``status`` and ``error`` describe the last one, as
    ``consumers.webhook.delivery.Outcome`` does.
    """

    event_id: str
    attempts: int
    status: int | None
    error: str | None


class PositionStore:
    def __init__(self, js: JetStreamContext, bucket: str = DEFAULT_BUCKET) -> None:
        self.js = js
        self.bucket = bucket
        self._kv: KeyValue | None = None
        # Workers of several endpoints share one store, so a lock lets one
        # create the bucket and the others find it.
        self._opening = asyncio.Lock()

    async def read(self, stream: str, endpoint: str) -> StoredPosition | None:
        """Return the endpoint's stored position, or None when there is none
        or the stored value is invalid (logged)."""
        key = _key(stream, endpoint)
        value = await self._get(key)
        if value is None:
            return None
        stored = _decode(value)
        if stored is None:
            self._log_invalid(
                "stored_position_invalid",
                key,
                value,
                "ignored; the endpoint starts as if none was stored",
            )
        return stored

    async def write(self, stream: str, endpoint: str, stored: StoredPosition) -> None:
        """Store ``stored`` as the endpoint's position, replacing the last one."""
        document = {
            "position": stored.position,
            "event_id": stored.event_id,
            "start": stored.start,
        }
        if stored.registry_id is not None:
            document["registry_id"] = stored.registry_id
        value = json.dumps(document, separators=(",", ":")).encode()
        await self._put(_key(stream, endpoint), value)

    async def read_failures(self, stream: str, endpoint: str) -> FailedAttempts | None:
        """Return the failed attempts stored for the endpoint, or None when
        none are stored or the stored value is invalid (logged)."""
        key = _failure_key(stream, endpoint)
        value = await self._get(key)
        if value is None:
            return None
        failures = _decode_failures(value)
        if failures is None:
            self._log_invalid(
                "stored_attempts_invalid",
                key,
                value,
                "ignored; the event's attempts count from 1",
            )
        return failures

    async def _get(self, key: str) -> bytes | None:
        """Return the value stored under ``key``, or None when there is none."""
        kv = await self._open()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value or b""

    def _log_invalid(self, event: str, key: str, value: bytes, note: str) -> None:
        """Log a stored ``value`` that cannot be decoded, with its start."""
        log.warning(
            event,
            bucket=self.bucket,
            key=key,
            value=value[:200].decode(errors="replace"),
            note=note,
        )

    async def write_failures(
        self, stream: str, endpoint: str, failures: FailedAttempts
    ) -> None:
        """Store ``failures`` as the endpoint's failed attempts, replacing the
        record of any other event."""
        document = {
            "event_id": failures.event_id,
            "attempts": failures.attempts,
            "status": failures.status,
            "error": failures.error,
        }
        value = json.dumps(document, separators=(",", ":")).encode()
        await self._put(_failure_key(stream, endpoint), value)

    async def delete_failures(self, stream: str, endpoint: str) -> None:
        """Remove the endpoint's failed attempts once their event is settled."""
        kv = await self._open()
        try:
            await kv.delete(_failure_key(stream, endpoint))
        except nats.js.errors.NoStreamResponseError:
            # The bucket is gone, and the record with it.
            await self._reopen(kv)

    async def _put(self, key: str, value: bytes) -> None:
        kv = await self._open()
        try:
            await kv.put(key, value)
        except nats.js.errors.NoStreamResponseError:
            # No stream stores the bucket's subjects: the bucket was deleted
            # since it was opened, for example with the NATS server's whole
            # store. It is created again, as the dead-letter stream is.
            log.warning(
                "position_bucket_missing",
                bucket=self.bucket,
                note="deleted since the webhook opened it; created again",
            )
            kv = await self._reopen(kv)
            await kv.put(key, value)

    async def _open(self) -> KeyValue:
        async with self._opening:
            if self._kv is None:
                self._kv = await self._open_or_create()
            return self._kv

    async def _reopen(self, stale: KeyValue) -> KeyValue:
        """Open or create the bucket again, unless another worker already
        replaced ``stale``."""
        async with self._opening:
            if self._kv is None or self._kv is stale:
                self._kv = await self._open_or_create()
            return self._kv

    async def _open_or_create(self) -> KeyValue:
        try:
            return await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        kv = await self.js.create_key_value(
            KeyValueConfig(
                bucket=self.bucket,
                description="the last event position each cairn webhook "
                "endpoint handled",
                history=1,
                storage=StorageType.FILE,
            )
        )
        log.info("position_bucket_created", bucket=self.bucket)
        return kv


def _key(stream: str, endpoint: str) -> str:
    # Stream and endpoint names contain only letters, digits, '-' and '_'.
    return f"{stream}.{endpoint}"


def _failure_key(stream: str, endpoint: str) -> str:
    # Three tokens, so that it never equals a position key, which has two.
    return f"{stream}.{endpoint}.failure"


def _json_object(value: bytes) -> dict[str, Any] | None:
    """Return ``value`` decoded as a JSON object, None when it is not one."""
    try:
        document: Any = json.loads(value)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _decode_failures(value: bytes) -> FailedAttempts | None:
    document = _json_object(value)
    if document is None:
        return None
    event_id = document.get("event_id")
    attempts = document.get("attempts")
    status = document.get("status")
    error = document.get("error")
    if (
        not isinstance(event_id, str)
        or not isinstance(attempts, int)
        or isinstance(attempts, bool)
        or attempts < 1
        or not (
            status is None or (isinstance(status, int) and not isinstance(status, bool))
        )
        or not isinstance(error, str | None)
    ):
        return None
    return FailedAttempts(event_id, attempts, status, error)


def _decode(value: bytes) -> StoredPosition | None:
    document = _json_object(value)
    if document is None:
        return None
    position = document.get("position")
    event_id = document.get("event_id")
    start = document.get("start")
    registry_id = document.get("registry_id")
    if (
        not isinstance(position, int)
        or isinstance(position, bool)
        or position < 1
        or not isinstance(event_id, str)
        or not isinstance(start, str)
        or not isinstance(registry_id, str | None)
    ):
        return None
    return StoredPosition(position, event_id, start, registry_id)
