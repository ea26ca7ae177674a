"""The NATS messages cairn publishes: events on the stream, pulls on core NATS."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final

from engine.bus.subjects import event_subject, pull_subject
from engine.domain.events import Actor, StoredEvent, format_time

# JetStream drops a message whose id it has seen within the stream's
# duplicate window.
MSG_ID: Final = "Nats-Msg-Id"
# JetStream rejects a message unless the stream's last sequence is this one.
# The relay chains its publishes with it to keep the stream in log order.
EXPECTED_LAST_SEQUENCE: Final = "Nats-Expected-Last-Sequence"

EVENT_ID: Final = "Cairn-Event-Id"
EVENT_TYPE: Final = "Cairn-Event-Type"
REPOSITORY: Final = "Cairn-Repository"
POSITION: Final = "Cairn-Position"
# The id of the registry whose log the event belongs to (engine.identity), so
# that subscribers of a stream that several registries publish to can tell
# their events apart.
REGISTRY_ID: Final = "Cairn-Registry-Id"
# Set to "true" on a stand-in: a message whose event was too large for the
# NATS server or the stream, sent with the payload left out.
PAYLOAD_OMITTED: Final = "Cairn-Payload-Omitted"

# The header block as nats-py 2.x encodes it: "NATS/1.0\r\n", then
# "Key: Value\r\n" per header, then "\r\n".
_HEADER_LINE_BYTES: Final = len(b"NATS/1.0\r\n")
_HEADER_END_BYTES: Final = len(b"\r\n")


def encode_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def event_message(
    prefix: str, event: StoredEvent, registry_id: str
) -> tuple[str, bytes, dict[str, str]]:
    """Return the subject, body and headers that carry ``event`` of the
    registry ``registry_id`` on the stream.

    The body is ``StoredEvent.to_json()``. The headers repeat the id, type,
    repository and position so that consumers can route without parsing it,
    and add the registry id, which the body does not contain.
    """
    event_id = str(event.id)
    headers = {
        MSG_ID: event_id,
        EVENT_ID: event_id,
        EVENT_TYPE: str(event.type),
        REPOSITORY: event.repository,
        POSITION: str(event.position),
        REGISTRY_ID: registry_id,
    }
    subject = event_subject(prefix, event.type, event.repository)
    return subject, encode_json(event.to_json()), headers


def stand_in_message(
    prefix: str, event: StoredEvent, registry_id: str
) -> tuple[str, bytes, dict[str, str]]:
    """Return the message that replaces ``event`` when it is too large to send.

    It has the subject and headers of the event's message plus
    ``Cairn-Payload-Omitted: true``. Its body is ``StoredEvent.to_json()``
    with ``payload`` set to null and ``payload_omitted`` set to true. The
    hashes stay, so the full event, read from ``GET /_cairn/events`` or the
    log at that position, can be checked against it.
    """
    subject, _, headers = event_message(prefix, event, registry_id)
    headers[PAYLOAD_OMITTED] = "true"
    document = event.to_json()
    document["payload"] = None
    document["payload_omitted"] = True
    return subject, encode_json(document), headers


def is_stand_in(document: dict[str, Any]) -> bool:
    """Return True if a decoded message body is a stand-in without its payload."""
    return document.get("payload_omitted") is True


def message_size(body: bytes, headers: dict[str, str]) -> int:
    """Return the bytes the NATS server counts against its max_payload.

    That is the header block and the body together. The stream's
    max_msg_size counts the same bytes; tests/test_relay_oversize.py checks
    the server's limit to the byte (nats-server 2.15).
    """
    header_bytes = _HEADER_LINE_BYTES + _HEADER_END_BYTES
    for key, value in headers.items():
        header_bytes += len(key.encode()) + len(b": ") + len(value.encode()) + 2
    return header_bytes + len(body)


def pull_message(
    prefix: str,
    repository: str,
    reference: str,
    digest: str,
    actor: Actor,
    request_id: str | None,
    time: datetime | None = None,
) -> tuple[str, bytes]:
    """Return the subject and body of a manifest pull notification."""
    body = {
        "type": "manifest.pulled",
        "repository": repository,
        "reference": reference,
        "digest": digest,
        "time": format_time(time or datetime.now(UTC)),
        "actor": actor.to_json(),
        "request_id": request_id,
    }
    return pull_subject(prefix, repository), encode_json(body)


def header_position(headers: dict[str, str] | None) -> int | None:
    """Return the log position a message header carries, or None."""
    value = (headers or {}).get(POSITION)
    if value is None or not value.isdigit():
        return None
    return int(value)
