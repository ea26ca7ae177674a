"""The webhook's configuration rules and request bodies, without servers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from consumers.webhook import delivery, worker
from consumers.webhook.config import (
    RESERVED_HEADERS,
    ConfigError,
    parse_config,
    parse_duration,
)
from consumers.webhook.delivery import build_request, sign
from consumers.webhook.lookup import EventLookup, EventLookupFailed, ManifestLookup
from consumers.webhook.payloads import (
    ManifestFacts,
    cloudevent,
    distribution_event,
    event_problem,
    media_type_of,
)
from engine.domain.events import Actor, EventType, StoredEvent
from tests.server import ServerThread

REGISTRY = "https://registry.example.com"
DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def event(event_type: EventType, **payload: Any) -> dict[str, Any]:
    return StoredEvent(
        position=7,
        id=uuid.uuid4(),
        repository="library/app",
        version=3,
        type=event_type,
        schema_version=1,
        time=datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
        actor=Actor("alice", "10.1.2.3"),
        request_id="req-1",
        payload=payload,
        previous_hash="0" * 64,
        hash="1" * 64,
    ).to_json()


def endpoint_config(**endpoint: Any) -> dict[str, Any]:
    return {"endpoints": [{"name": "hook", "url": "http://127.0.0.1:9/h", **endpoint}]}


# ---- configuration ----------------------------------------------------------------


def test_config_defaults() -> None:
    config = parse_config(endpoint_config())

    endpoint = config.endpoints[0]
    assert endpoint.format == "distribution"
    assert endpoint.consumer_name == "cairn-webhook-hook"
    assert endpoint.start == "new"
    assert endpoint.ack_wait > endpoint.timeout
    assert config.stream == "CAIRN"
    assert config.nats_url is None
    assert config.dead_letter_stream == "CAIRN_WEBHOOK_DEAD_LETTERS"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(5, 5.0), (0.5, 0.5), ("500ms", 0.5), ("2s", 2.0), ("2m", 120.0), ("1h", 3600.0)],
)
def test_config_durations(value: Any, seconds: float) -> None:
    assert parse_duration(value, "timeout") == seconds


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ({"tiemout": 5}, "unknown keys ['tiemout']"),
        ({"name": "a.b"}, "invalid name 'a.b'"),
        ({"url": "ftp://127.0.0.1/h"}, "invalid URL"),
        ({"format": "xml"}, "invalid format 'xml'"),
        ({"timeout": "5 parsecs"}, "invalid duration"),
        ({"timeout": 0}, "must be positive"),
        ({"timeout": float("nan")}, "timeout: invalid duration nan"),
        ({"timeout": float("inf")}, "timeout: invalid duration inf"),
        ({"ack_wait": float("nan")}, "ack_wait: invalid duration nan"),
        ({"ack_wait": float("inf")}, "ack_wait: invalid duration inf"),
        ({"backoff_initial": float("nan")}, "backoff_initial: invalid duration nan"),
        ({"backoff_max": float("nan")}, "backoff_max: invalid duration nan"),
        ({"backoff_max": float("inf")}, "backoff_max: invalid duration inf"),
        # NATS reads ack_wait as int64 nanoseconds, which 1e30 s overflows.
        ({"ack_wait": 1e30}, "ack_wait: invalid duration 1e+30"),
        ({"ack_wait": "9223372037s"}, "ack_wait: invalid duration '9223372037s'"),
        ({"timeout": "\u0663s"}, "timeout: invalid duration '\u0663s'"),
        ({"timeout": 10, "ack_wait": 10}, "ack_wait (10 s) must be longer"),
        ({"event_types": ["manifest.pushd"]}, "matches no event type"),
        ({"event_types": ["tags"]}, "event type pattern 'tags' matches no event"),
        ({"event_types": ["Tag"]}, "event type pattern 'Tag' matches no event"),
        ({"event_types": []}, "event_types is an empty list, which would match"),
        ({"repositories": []}, "repositories is an empty list, which would match"),
        ({"max_attempts": 0}, "max_attempts must be at least 1, got 0"),
        ({"max_attempts": "3"}, "max_attempts must be an integer, got '3'"),
        ({"max_attempts": True}, "max_attempts must be an integer, got True"),
        (
            {"backoff_initial": "10s", "backoff_max": "1s"},
            "backoff_max (1 s) must be at least backoff_initial (10 s)",
        ),
        ({"secret": "x", "secret_env": "Y"}, "set only one of secret, secret_env"),
        ({"secret_env": "CAIRN_TEST_UNSET_SECRET"}, "is not set"),
        ({"headers": {"X-Many": [1]}}, "header X-Many must be a string"),
        ({"headers": {"Bad Header": "x"}}, "invalid header name 'Bad Header'"),
        ({"headers": {"": "x"}}, "invalid header name ''"),
        ({"headers": {"X:Y": "x"}}, "invalid header name 'X:Y'"),
        ({"headers": {"X-Team": "\u00e9quipe"}}, "invalid value of header X-Team"),
        ({"headers": {"X-Team": "a\nb"}}, "invalid value of header X-Team"),
        ({"headers": {"X-Team": ["ok", " lead"]}}, "invalid value of header X-Team"),
        ({"headers": {"content-type": "text/plain"}}, "header content-type is set"),
        ({"headers": {"Cairn-Signature": "sha256=0"}}, "header Cairn-Signature is set"),
        ({"headers": {"Idempotency-Key": "k"}}, "header Idempotency-Key is set"),
        ({"headers": {"Content-Length": "1"}}, "header Content-Length is set"),
        ({"start": "middle"}, "invalid start 'middle'"),
        ({"repositories": ["Library/*"]}, "invalid repository pattern 'Library/*'"),
        ({"repositories": ["library/app:v1"]}, "would match none"),
        ({"repositories": ["team-[ab/*"]}, "a '[' has no closing ']'"),
    ],
)
def test_config_rejects(endpoint: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(endpoint_config(**endpoint))

    assert message in str(error.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"nats": {"stream": "bad.name"}}, "[nats] stream: invalid stream name"),
        ({"nats": {"stream": 5}}, "[nats] stream: invalid stream name 5"),
        ({"nats": {"subject_prefix": "a.>"}}, "[nats] subject_prefix: invalid"),
        ({"nats": {"url": "junk"}}, "[nats] url: invalid NATS URL 'junk'"),
        ({"nats": {"url": "http://127.0.0.1:4222"}}, "[nats] url: invalid NATS URL"),
        ({"nats": {"url": "nats://127.0.0.1:99999"}}, "[nats] url: invalid NATS URL"),
        ({"nats": {"url": 4222}}, "[nats] url"),
        (
            {"dead_letters": {"stream": "x" * 33}},
            "[dead_letters] stream: invalid stream name",
        ),
        (
            {"dead_letters": {"subject_prefix": ""}},
            "[dead_letters] subject_prefix: invalid subject prefix ''",
        ),
    ],
)
def test_config_rejects_bus_names(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({**endpoint_config(), **document})

    assert message in str(error.value)


def test_config_error_hides_nats_password() -> None:
    document = {**endpoint_config(), "nats": {"url": "ftp://user:s3cret@host:4222"}}
    with pytest.raises(ConfigError) as error:
        parse_config(document)

    assert "[nats] url" in str(error.value)
    assert "s3cret" not in str(error.value)


def test_config_keeps_valid_nats_url() -> None:
    document = {**endpoint_config(), "nats": {"url": "tls://nats.internal:4443"}}

    assert parse_config(document).nats_url == "tls://nats.internal:4443"


def test_config_error_hides_header_value() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(endpoint_config(headers={"Authorization": "Bearer s3cret\n"}))

    assert "Authorization" in str(error.value)
    assert "s3cret" not in str(error.value)


def test_reserved_headers_cover_delivery_headers() -> None:
    sent = [
        delivery.SIGNATURE_HEADER,
        delivery.IDEMPOTENCY_HEADER,
        delivery.EVENT_ID_HEADER,
        delivery.EVENT_TYPE_HEADER,
        delivery.REPOSITORY_HEADER,
        delivery.ATTEMPT_HEADER,
        "Content-Type",
    ]
    for name in sent:
        assert name.lower() in RESERVED_HEADERS


def test_config_rejects_duplicate_names() -> None:
    document = {
        "endpoints": [
            {"name": "same", "url": "http://127.0.0.1:9/a"},
            {"name": "same", "url": "http://127.0.0.1:9/b"},
        ]
    }

    with pytest.raises(ConfigError, match="repeated: \\['same'\\]"):
        parse_config(document)


def test_config_requires_endpoints() -> None:
    with pytest.raises(ConfigError, match="no endpoints configured"):
        parse_config({"nats": {"url": "nats://127.0.0.1:4222"}})


def test_config_reads_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("from-a-file\n")

    config = parse_config(endpoint_config(secret_file="secret.txt"), tmp_path)

    assert config.endpoints[0].secret == "from-a-file"
    assert "from-a-file" not in repr(config)


def test_endpoint_safe_url_hides_credentials() -> None:
    config = parse_config(
        {"endpoints": [{"name": "h", "url": "https://u:p@example.com:8443/h?token=t"}]}
    )

    assert config.endpoints[0].safe_url == "https://example.com:8443/h"
    assert "token" not in repr(config)


def test_config_headers_accept_lists() -> None:
    config = parse_config(
        endpoint_config(
            headers={
                "Authorization": "Bearer x",
                "X-Tag": ["a", "b"],
                "X-Empty": "",
                "User-Agent": "ci/1.0 (cairn)",
            }
        )
    )

    assert config.endpoints[0].headers == (
        ("Authorization", "Bearer x"),
        ("X-Tag", "a"),
        ("X-Tag", "b"),
        ("X-Empty", ""),
        ("User-Agent", "ci/1.0 (cairn)"),
    )


def test_endpoint_filters() -> None:
    config = parse_config(
        endpoint_config(
            event_types=["manifest.*"],
            repositories=["library/*"],
            ignore_media_types=["application/vnd.oci.image.index.*"],
        )
    )
    endpoint = config.endpoints[0]

    assert endpoint.accepts("manifest.pushed", "library/app")
    assert not endpoint.accepts("tag.set", "library/app")
    assert not endpoint.accepts("manifest.pushed", "team/app")
    assert endpoint.ignores_media_type("application/vnd.oci.image.index.v1+json")
    assert not endpoint.ignores_media_type("application/vnd.oci.image.manifest.v1+json")
    assert not endpoint.ignores_media_type(None)


@pytest.mark.parametrize(
    ("family", "accepted", "rejected"),
    [
        ("tag", ["tag.set", "tag.deleted"], ["manifest.pushed", "blob.deleted"]),
        ("manifest", ["manifest.pushed", "manifest.deleted"], ["tag.set"]),
        ("blob", ["blob.mounted", "blob.deleted"], ["manifest.pushed"]),
    ],
)
def test_endpoint_event_family(
    family: str, accepted: list[str], rejected: list[str]
) -> None:
    config = parse_config(endpoint_config(event_types=[family]))
    endpoint = config.endpoints[0]

    for event_type in accepted:
        assert endpoint.accepts(event_type, "library/app"), event_type
    for event_type in rejected:
        assert not endpoint.accepts(event_type, "library/app"), event_type


# ---- Distribution envelope ---------------------------------------------------------


def test_distribution_manifest_push() -> None:
    pushed = event(
        EventType.MANIFEST_PUSHED,
        digest=DIGEST,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=512,
    )

    notification = distribution_event(pushed, REGISTRY, None)

    assert notification == {
        "id": pushed["id"],
        "timestamp": "2026-01-02T03:04:05.600000Z",
        "action": "push",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 512,
            "digest": DIGEST,
            "length": 512,
            "repository": "library/app",
            "url": f"{REGISTRY}/v2/library/app/manifests/{DIGEST}",
        },
        "request": {
            "id": "req-1",
            "addr": "10.1.2.3",
            "host": "registry.example.com",
            "method": "PUT",
            "useragent": "",
        },
        "actor": {"name": "alice"},
        "source": {"addr": "registry.example.com"},
    }


def test_distribution_blob_mount() -> None:
    mounted = event(EventType.BLOB_MOUNTED, digest=DIGEST, size=10, **{"from": "a/b"})

    notification = distribution_event(mounted, REGISTRY, None)

    assert notification["action"] == "mount"
    assert notification["request"]["method"] == "POST"
    assert notification["target"]["fromRepository"] == "a/b"
    assert notification["target"]["mediaType"] == "application/octet-stream"
    assert notification["target"]["url"] == f"{REGISTRY}/v2/library/app/blobs/{DIGEST}"


def test_distribution_tag_set_uses_looked_up_facts() -> None:
    tagged = event(EventType.TAG_SET, tag="v1", digest=DIGEST, previous=OTHER)
    facts = ManifestFacts("application/vnd.oci.image.index.v1+json", 300)

    with_facts = distribution_event(tagged, REGISTRY, facts)["target"]
    without = distribution_event(tagged, None, None)["target"]

    assert with_facts["tag"] == "v1"
    assert with_facts["mediaType"] == facts.media_type
    assert with_facts["size"] == with_facts["length"] == 300
    assert without == {"digest": DIGEST, "repository": "library/app", "tag": "v1"}
    assert media_type_of(tagged, facts) == facts.media_type
    assert media_type_of(tagged, None) is None


@pytest.mark.parametrize(
    ("deleted", "target"),
    [
        (
            event(EventType.MANIFEST_DELETED, digest=DIGEST),
            {"digest": DIGEST, "repository": "library/app"},
        ),
        (
            event(EventType.BLOB_DELETED, digest=DIGEST),
            {"digest": DIGEST, "repository": "library/app"},
        ),
        (
            event(EventType.TAG_DELETED, tag="v1", previous=DIGEST),
            {"repository": "library/app", "tag": "v1"},
        ),
    ],
    ids=["manifest", "blob", "tag"],
)
def test_distribution_deletes(deleted: dict[str, Any], target: dict[str, Any]) -> None:
    notification = distribution_event(deleted, REGISTRY, None)

    assert notification["action"] == "delete"
    assert notification["request"]["method"] == "DELETE"
    assert notification["target"] == target


def test_distribution_without_actor_or_registry() -> None:
    pushed = event(EventType.BLOB_PUSHED, digest=DIGEST, size=3)
    pushed["actor"] = {"user": None, "address": None}

    notification = distribution_event(pushed, None, None)

    assert notification["actor"] == {}
    assert notification["source"] == {}
    assert "url" not in notification["target"]
    assert notification["request"]["addr"] == ""


# ---- CloudEvents -------------------------------------------------------------------


def test_cloudevent_structure() -> None:
    tagged = event(EventType.TAG_SET, tag="v1", digest=DIGEST, previous=None)

    document = cloudevent(tagged, REGISTRY)

    assert document == {
        "specversion": "1.0",
        "id": tagged["id"],
        "source": f"{REGISTRY}/v2/library/app",
        "type": "io.cairn.tag.set",
        "subject": "v1",
        "time": "2026-01-02T03:04:05.600000Z",
        "datacontenttype": "application/json",
        "data": tagged,
    }


# ---- requests ------------------------------------------------------------------------


def test_request_signature_and_content_type() -> None:
    config = parse_config(endpoint_config(format="cloudevents", secret="k"))
    endpoint = config.endpoints[0]
    pushed = event(EventType.BLOB_PUSHED, digest=DIGEST, size=3)

    request = build_request(endpoint, pushed, None, None)

    assert request.content_type == "application/cloudevents+json"
    assert request.event_id == pushed["id"]
    assert json.loads(request.body)["id"] == pushed["id"]
    expected = hmac.new(b"k", request.body, hashlib.sha256).hexdigest()
    assert sign("k", request.body) == f"sha256={expected}"


# ---- event checks ----------------------------------------------------------------


def test_event_problem_accepts_events() -> None:
    pushed = event(EventType.MANIFEST_PUSHED, digest=DIGEST)
    stand_in = {**pushed, "payload": None, "payload_omitted": True}

    assert event_problem(pushed) is None
    assert event_problem(stand_in) is None
    assert event_problem({**pushed, "type": "repository.renamed"}) is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"time": None}, "event field 'time' is None, expected a string"),
        ({"id": 7}, "event field 'id' is 7, expected a string"),
        ({"payload": [1]}, "event field 'payload' is [1], expected an object"),
        ({"actor": "alice"}, "event field 'actor' is 'alice', expected an object"),
        ({"schema_version": "1"}, "event field 'schema_version' is '1'"),
        ({"schema_version": True}, "event field 'schema_version' is True"),
    ],
)
def test_event_problem_wrong_types(change: dict[str, Any], problem: str) -> None:
    pushed = event(EventType.MANIFEST_PUSHED, digest=DIGEST)

    found = event_problem({**pushed, **change})

    assert found is not None
    assert problem in found


@pytest.mark.parametrize("key", ["id", "type", "repository", "time"])
def test_event_problem_missing_field(key: str) -> None:
    pushed = event(EventType.MANIFEST_PUSHED, digest=DIGEST)
    del pushed[key]

    assert event_problem(pushed) == f"event field {key!r} is missing"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([], "the event is a JSON array, expected a JSON object"),
        (None, "the event is null, expected a JSON object"),
        (3, "the event is the JSON value 3, expected a JSON object"),
    ],
)
def test_event_problem_not_object(value: Any, problem: str) -> None:
    assert event_problem(value) == problem


def test_event_lookup_rejects_invalid_event() -> None:
    pushed = event(EventType.MANIFEST_PUSHED, digest=DIGEST)
    del pushed["time"]

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"events": [pushed]})

    async def look_up() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(respond))
        lookup = EventLookup(REGISTRY, client)
        try:
            await lookup.event(pushed["position"], pushed["id"])
        finally:
            await lookup.aclose()

    with pytest.raises(EventLookupFailed) as failed:
        asyncio.run(look_up())

    assert f"returned an invalid event {pushed['id']}" in str(failed.value)
    assert "event field 'time' is missing" in str(failed.value)


def test_worker_rejects_event_without_time() -> None:
    pushed = event(EventType.MANIFEST_PUSHED, digest=DIGEST)
    del pushed["time"]
    message = SimpleNamespace(data=json.dumps(pushed).encode())

    decoded, problem = worker._decode(message)

    assert decoded is None
    assert problem == "event field 'time' is missing"


def test_worker_rejects_message_not_json() -> None:
    decoded, problem = worker._decode(SimpleNamespace(data=b"{not json"))

    assert decoded is None
    assert problem is not None
    assert problem.startswith("the message is not JSON: ")


def _closed_port() -> int:
    """Return a loopback port on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_lookup_keeps_facts_of_pushed_manifest() -> None:
    # The registry is unreachable here. For a manifest deleted before its tag
    # event is delivered it would not help either, so the push's facts are
    # returned.
    lookup = ManifestLookup(f"http://127.0.0.1:{_closed_port()}")
    pushed = event(
        EventType.MANIFEST_PUSHED,
        digest=DIGEST,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=512,
    )

    async def facts_before_and_after() -> tuple[Any, Any]:
        try:
            before = await lookup.facts("library/app", DIGEST)
            lookup.remember(pushed)
            return before, await lookup.facts("library/app", DIGEST)
        finally:
            await lookup.aclose()

    before, after = asyncio.run(facts_before_and_after())

    assert before is None
    assert after == ManifestFacts("application/vnd.oci.image.manifest.v1+json", 512)


@pytest.mark.parametrize(
    "payload",
    [
        {"digest": DIGEST, "media_type": "application/json"},
        {"digest": DIGEST, "size": 3},
        {"digest": DIGEST, "media_type": "application/json", "size": True},
        {"media_type": "application/json", "size": 3},
    ],
)
def test_lookup_ignores_incomplete_push(payload: dict[str, Any]) -> None:
    lookup = ManifestLookup(f"http://127.0.0.1:{_closed_port()}")

    async def facts_after() -> Any:
        try:
            lookup.remember(event(EventType.MANIFEST_PUSHED, **payload))
            return await lookup.facts("library/app", DIGEST)
        finally:
            await lookup.aclose()

    assert asyncio.run(facts_after()) is None


def test_feed_401_names_registry_url(auth_server: ServerThread) -> None:
    async def read_page() -> None:
        lookup = EventLookup(auth_server.url)
        try:
            await lookup.events_after(0, 1)
        finally:
            await lookup.aclose()

    with pytest.raises(EventLookupFailed) as failed:
        asyncio.run(read_page())

    message = str(failed.value)
    assert "HTTP 401" in message
    assert "put them in [registry] url" in message
    assert "--source-creds" not in message
