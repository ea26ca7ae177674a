"""Digests, names and tags, and the event envelope."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime

import pytest

from engine.domain.digest import Digest, DigestVerifier
from engine.domain.errors import (
    DigestInvalid,
    DigestMismatch,
    NameInvalid,
    TagInvalid,
    UnsupportedDigestAlgorithm,
)
from engine.domain.events import (
    GENESIS_HASH,
    Actor,
    EventType,
    NewEvent,
    StoredEvent,
    event_hash,
    upcast,
    uuid7,
)
from engine.domain.names import validate_repository_name, validate_tag

SHA256_EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()
SHA512_EMPTY = "sha512:" + hashlib.sha512(b"").hexdigest()


@pytest.mark.parametrize("value", [SHA256_EMPTY, SHA512_EMPTY])
def test_digest_parse_round_trip(value: str) -> None:
    assert str(Digest.parse(value)) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256",
        "sha256:",
        "sha256:abc",
        "SHA256:" + "a" * 64,
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "sha256:" + "a" * 65,
        ":" + "a" * 64,
        "sha256:" + "a" * 63 + "\n",
    ],
)
def test_digest_parse_rejects_and_names_value(value: str) -> None:
    with pytest.raises(DigestInvalid) as caught:
        Digest.parse(value)
    assert caught.value.detail["digest"] == value


def test_digest_unknown_algorithm() -> None:
    with pytest.raises(UnsupportedDigestAlgorithm) as caught:
        Digest.parse("md5:" + "a" * 32)
    assert caught.value.detail["supported"] == ["sha256", "sha512"]


def test_digest_verifier_streams() -> None:
    verifier = DigestVerifier("sha512")
    for part in (b"ab", b"", b"c"):
        verifier.update(part)
    assert verifier.size == 3
    verifier.verify(Digest.of(b"abc", "sha512"))
    with pytest.raises(DigestMismatch) as caught:
        verifier.verify(Digest.of(b"abd", "sha512"))
    assert caught.value.detail["actual"] == str(Digest.of(b"abc", "sha512"))


@pytest.mark.parametrize(
    "name",
    ["a", "library/alpine", "a.b_c__d---e/f0", "x" * 255, "ns/sub/deep/repo"],
)
def test_repository_name_valid(name: str) -> None:
    assert validate_repository_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Upper",
        "a//b",
        "/a",
        "a/",
        "a..b",
        "a___b",
        "-a",
        "a-",
        "a b",
        "x" * 256,
        "a/../b",
        "a%2fb",
    ],
)
def test_repository_name_invalid(name: str) -> None:
    with pytest.raises(NameInvalid) as caught:
        validate_repository_name(name)
    assert caught.value.detail["name"] == name


@pytest.mark.parametrize("tag", ["latest", "v1.0.0", "_x", "A" * 128, "1-2_3.4"])
def test_tag_valid(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "A" * 129, "a/b", "a:b", "a b"])
def test_tag_invalid(tag: str) -> None:
    with pytest.raises(TagInvalid) as caught:
        validate_tag(tag)
    assert caught.value.detail["tag"] == tag


def _event(**changes: object) -> StoredEvent:
    fields: dict[str, object] = {
        "position": 1,
        "id": uuid.UUID(int=1),
        "repository": "a",
        "version": 1,
        "type": EventType.TAG_SET,
        "schema_version": 1,
        "time": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "actor": Actor("u", "127.0.0.1"),
        "request_id": "r",
        "payload": {"tag": "t", "digest": SHA256_EMPTY, "previous": None},
        "previous_hash": GENESIS_HASH,
    }
    fields.update(changes)
    return StoredEvent(**fields, hash=event_hash(**fields))  # type: ignore[arg-type]


def test_event_hash_covers_every_field() -> None:
    base = _event()
    assert base.expected_hash() == base.hash
    variants = [
        _event(position=2),
        _event(id=uuid.UUID(int=2)),
        _event(repository="b"),
        _event(version=2),
        _event(type=EventType.TAG_DELETED),
        _event(time=datetime(2026, 1, 2, 3, 4, 5, 678902, tzinfo=UTC)),
        _event(actor=Actor("v", "127.0.0.1")),
        _event(request_id=None),
        _event(payload={"tag": "t", "digest": SHA256_EMPTY, "previous": "x"}),
        _event(previous_hash="1" * 64),
    ]
    assert (
        len({variant.hash for variant in variants} | {base.hash}) == len(variants) + 1
    )


def test_event_hash_ignores_key_order() -> None:
    first = _event(payload={"a": 1, "b": 2})
    second = _event(payload={"b": 2, "a": 1})
    assert first.hash == second.hash


def test_upcast_rejects_newer_schema() -> None:
    with pytest.raises(ValueError, match="upgrade cairn"):
        upcast(EventType.TAG_SET, 99, {})
    assert upcast(EventType.TAG_SET, 1, {"tag": "t"}) == {"tag": "t"}


def test_event_ids_are_version_7() -> None:
    event = NewEvent(EventType.TAG_SET, "repo", {"tag": "a"})
    assert event.id.version == 7
    assert event.id.variant == uuid.RFC_4122


def test_event_ids_sort_by_time() -> None:
    earlier = [uuid7() for _ in range(100)]
    time.sleep(0.002)
    later = uuid7()
    assert later > max(earlier)
    assert len(set(earlier)) == len(earlier)
