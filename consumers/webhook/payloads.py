"""Request bodies for webhook deliveries, one event per request.

``distribution`` is the notification envelope of CNCF Distribution
(``notifications/event.go`` in distribution 2.8): ``{"events": [...]}`` with
id, timestamp, action, target, request, actor and source, sent as
``application/vnd.docker.distribution.events.v1+json``. Receivers written for
Distribution read it unchanged. Fields that cairn's events do not record,
such as the client's user agent, are sent empty as Distribution does.

``cloudevents`` is CloudEvents 1.0 in structured JSON mode
(``application/cloudevents+json``) with the cairn event as ``data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlsplit

from engine.domain.events import EventType, upcast

DISTRIBUTION_MEDIA_TYPE: Final = "application/vnd.docker.distribution.events.v1+json"
CLOUDEVENTS_MEDIA_TYPE: Final = "application/cloudevents+json"
CLOUDEVENTS_TYPE_PREFIX: Final = "io.cairn."

# Blob events carry no media type; Distribution's own blob events do not
# know the layer's type either.
BLOB_MEDIA_TYPE: Final = "application/octet-stream"

_ACTIONS: Final = {
    EventType.BLOB_PUSHED: ("push", "PUT"),
    EventType.BLOB_MOUNTED: ("mount", "POST"),
    EventType.BLOB_DELETED: ("delete", "DELETE"),
    EventType.MANIFEST_PUSHED: ("push", "PUT"),
    EventType.MANIFEST_DELETED: ("delete", "DELETE"),
    EventType.TAG_SET: ("push", "PUT"),
    EventType.TAG_DELETED: ("delete", "DELETE"),
}


@dataclass(frozen=True, slots=True)
class ManifestFacts:
    """A manifest's media type and size, looked up on the registry, because a
    tag event does not carry them and Distribution targets include them."""

    media_type: str
    size: int


# The event types that this cairn can encode.
EVENT_TYPES: Final = frozenset(str(event_type) for event_type in EventType)
# Fields that every request body reads, and that must be strings.
_REQUIRED_TEXT: Final = ("id", "type", "repository", "time")


def event_problem(event: Any) -> str | None:
    """Describe what makes ``event`` unusable for a request body, or return None.

    The body builders read these fields without further checks, so an
    event from NATS, a dead letter or the event feed is checked first.
    The event type may still be one that this cairn does not know.
    """
    if not isinstance(event, dict):
        return f"the event is {_json_kind(event)}, expected a JSON object"
    for key in _REQUIRED_TEXT:
        if key not in event:
            return f"event field {key!r} is missing"
        if not isinstance(event[key], str):
            return f"event field {key!r} is {event[key]!r}, expected a string"
    for key in ("payload", "actor"):
        value = event.get(key)
        if value is not None and not isinstance(value, dict):
            return f"event field {key!r} is {value!r}, expected an object or null"
    version = event.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int | None):
        return f"event field 'schema_version' is {version!r}, expected an integer"
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, str):
        return "a JSON string"
    if value is None:
        return "null"
    return f"the JSON value {value!r}"


def current_payload(event: dict[str, Any]) -> dict[str, Any]:
    """Return the event's payload upcast to the current schema version.

    A payload newer than this cairn understands is returned as it is.
    """
    payload: dict[str, Any] = event.get("payload") or {}
    try:
        return upcast(EventType(event["type"]), int(event["schema_version"]), payload)
    except (KeyError, ValueError):
        return payload


def media_type_of(event: dict[str, Any], facts: ManifestFacts | None) -> str | None:
    """Return the media type of what the event is about, when it is known."""
    event_type = event.get("type")
    if event_type == EventType.MANIFEST_PUSHED:
        media_type = current_payload(event).get("media_type")
        return media_type if isinstance(media_type, str) else None
    if event_type in (EventType.BLOB_PUSHED, EventType.BLOB_MOUNTED):
        return BLOB_MEDIA_TYPE
    if event_type == EventType.TAG_SET and facts is not None:
        return facts.media_type
    return None


def announced_by_tag_event(event: dict[str, Any]) -> bool:
    """Tell whether ``event`` is a manifest.pushed by tag.

    The tag.set event of the same commit follows it. Distribution sends one
    push notification for a push by tag, with the tag, so an endpoint in
    that format that also receives tag.set skips this event.
    """
    return event.get("type") == EventType.MANIFEST_PUSHED and bool(
        current_payload(event).get("tag")
    )


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def distribution_body(
    event: dict[str, Any], registry_url: str | None, facts: ManifestFacts | None
) -> bytes:
    return encode({"events": [distribution_event(event, registry_url, facts)]})


def distribution_event(
    event: dict[str, Any], registry_url: str | None, facts: ManifestFacts | None
) -> dict[str, Any]:
    """Map one cairn event to one Distribution notification event."""
    event_type = EventType(event["type"])
    payload = current_payload(event)
    repository: str = event["repository"]
    action, method = _ACTIONS[event_type]
    host = urlsplit(registry_url).netloc if registry_url else ""

    target: dict[str, Any] = {}
    # tag.deleted carries "previous", not "digest": its target is the tag.
    digest = payload.get("digest")
    media_type = media_type_of(event, facts)
    size = _size(event_type, payload, facts)
    if action != "delete":
        if media_type is not None:
            target["mediaType"] = media_type
        if size is not None:
            target["size"] = size
    if digest:
        target["digest"] = digest
    if action != "delete" and size is not None:
        target["length"] = size
    target["repository"] = repository
    if event_type == EventType.BLOB_MOUNTED and payload.get("from"):
        target["fromRepository"] = payload["from"]
    if action != "delete" and registry_url and digest:
        kind = "blobs" if event_type.startswith("blob.") else "manifests"
        target["url"] = f"{registry_url}/v2/{quote(repository)}/{kind}/{digest}"
    if payload.get("tag"):
        target["tag"] = payload["tag"]

    actor = event.get("actor") or {}
    document: dict[str, Any] = {
        "id": event["id"],
        "timestamp": event["time"],
        "action": action,
        "target": target,
        "request": {
            "id": event.get("request_id") or "",
            "addr": actor.get("address") or "",
            "host": host,
            "method": method,
            "useragent": "",
        },
        "actor": {"name": actor["user"]} if actor.get("user") else {},
        "source": {"addr": host} if host else {},
    }
    return document


def _size(
    event_type: EventType, payload: dict[str, Any], facts: ManifestFacts | None
) -> int | None:
    if event_type == EventType.TAG_SET:
        return facts.size if facts is not None else None
    size = payload.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def cloudevents_body(event: dict[str, Any], registry_url: str | None) -> bytes:
    return encode(cloudevent(event, registry_url))


def cloudevent(event: dict[str, Any], registry_url: str | None) -> dict[str, Any]:
    """Wrap one cairn event as a CloudEvents 1.0 structured-mode document.

    ``source`` is the repository's URL (``<registry>/v2/<repository>``, or
    the path alone without a registry URL) and ``subject`` the tag or
    digest within it.
    """
    payload = current_payload(event)
    repository: str = event["repository"]
    source = f"{registry_url or ''}/v2/{quote(repository)}"
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": event["id"],
        "source": source,
        "type": CLOUDEVENTS_TYPE_PREFIX + event["type"],
        "time": event["time"],
        "datacontenttype": "application/json",
        "data": event,
    }
    # A manifest.pushed by tag names the tag too, but its subject is the
    # manifest.
    key = "tag" if str(event["type"]).startswith("tag.") else "digest"
    subject = payload.get(key)
    if subject:
        document["subject"] = subject
    return document
