"""Each endpoint's last handled position, kept in a JetStream key-value bucket.

JetStream keeps an endpoint's place in its durable consumer, but deleting
the stream deletes the consumer too. A worker that is running at that moment
re-creates the consumer after the last position it handled, and a webhook
that starts later reads that position here. The bucket
(``CAIRN_WEBHOOK_POSITIONS``, file storage, one revision per key) lives on
the NATS server beside the dead-letter stream, so it survives the loss of
the webhook's host.

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
        kv = await self._open()
        key = _key(stream, endpoint)
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        stored = _decode(entry.value or b"")
        if stored is None:
            log.warning(
                "stored_position_invalid",
                bucket=self.bucket,
                key=key,
                value=(entry.value or b"")[:200].decode(errors="replace"),
                note="ignored; the endpoint starts as if none was stored",
            )
        return stored

    async def write(self, stream: str, endpoint: str, stored: StoredPosition) -> None:
        """Store ``stored`` as the endpoint's position, replacing the last one."""
        kv = await self._open()
        document = {
            "position": stored.position,
            "event_id": stored.event_id,
            "start": stored.start,
        }
        if stored.registry_id is not None:
            document["registry_id"] = stored.registry_id
        value = json.dumps(document, separators=(",", ":")).encode()
        key = _key(stream, endpoint)
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


def _decode(value: bytes) -> StoredPosition | None:
    try:
        document: Any = json.loads(value)
    except ValueError:
        return None
    if not isinstance(document, dict):
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
