"""Pushes of ambiguous or too deeply nested manifests over real HTTP.

The cases are an image manifest with an index's field, an index with an
image manifest's fields, a repeated key, nesting past the limit, and
numbers that are not finite JSON numbers. Each
is rejected with 400 MANIFEST_INVALID, pushed by tag and by digest, and
leaves no event, tag or manifest behind. A digest also keeps the media type
it was first pushed as.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from engine.api.app import create_app
from engine.domain.digest import Digest
from engine.domain.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_NESTING,
    OCI_INDEX,
    OCI_MANIFEST,
)
from engine.registry import Registry
from tests.images import encode, make_image, make_index
from tests.server import ServerThread, push_blob, push_image, running, stored_state

REPOSITORY = "demo/app"


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@dataclass
class BadPush:
    body: bytes
    content_type: str
    detail: dict[str, Any]
    # A word that the error message contains.
    named: str


def _image_with_blobs(api: httpx.Client, docker: bool = False) -> dict[str, Any]:
    """Push an image's blobs, which also creates the repository, and return
    its manifest unpushed."""
    image = make_image(docker=docker)
    for blob in image.blobs:
        push_blob(api, REPOSITORY, blob)
    body: dict[str, Any] = json.loads(image.manifest)
    return body


def _index_with_child(api: httpx.Client, media_type: str) -> dict[str, Any]:
    child = make_image()
    push_image(api, REPOSITORY, child)
    body: dict[str, Any] = json.loads(make_index([child]))
    body["mediaType"] = media_type
    return body


def _manifest_with_manifests(api: httpx.Client) -> BadPush:
    body = _image_with_blobs(api)
    body["manifests"] = []
    return BadPush(
        encode(body),
        OCI_MANIFEST,
        {"field": "manifests", "mediaType": OCI_MANIFEST},
        "manifests",
    )


def _docker_manifest_with_manifests(api: httpx.Client) -> BadPush:
    body = _image_with_blobs(api, docker=True)
    body["manifests"] = []
    return BadPush(
        encode(body),
        DOCKER_MANIFEST,
        {"field": "manifests", "mediaType": DOCKER_MANIFEST},
        "manifests",
    )


def _untyped_both_kinds(api: httpx.Client) -> bytes:
    body = _image_with_blobs(api)
    del body["mediaType"]
    body["manifests"] = []
    return encode(body)


def _untyped_as_manifest(api: httpx.Client) -> BadPush:
    return BadPush(
        _untyped_both_kinds(api),
        OCI_MANIFEST,
        {"field": "manifests", "mediaType": OCI_MANIFEST},
        "manifests",
    )


def _untyped_as_index(api: httpx.Client) -> BadPush:
    return BadPush(
        _untyped_both_kinds(api),
        OCI_INDEX,
        {"field": "config", "mediaType": OCI_INDEX},
        "config",
    )


def _index_with(api: httpx.Client, media_type: str, field: str) -> BadPush:
    body = _index_with_child(api, media_type)
    image = _image_with_blobs(api)
    body[field] = image[field]
    return BadPush(
        encode(body), media_type, {"field": field, "mediaType": media_type}, field
    )


def _duplicate_config_digest(api: httpx.Client) -> BadPush:
    # json.loads keeps the last value, the present blob, but a parser that
    # keeps the first reads a config the repository lacks.
    body = _image_with_blobs(api)
    present = body["config"]["digest"]
    missing = str(Digest.of(b"a config blob that was never pushed"))
    raw = encode(body).replace(
        f'"digest": "{present}"'.encode(),
        f'"digest": "{missing}", "digest": "{present}"'.encode(),
        1,
    )
    return BadPush(raw, OCI_MANIFEST, {"key": "digest"}, "digest")


def _duplicate_media_type(api: httpx.Client) -> BadPush:
    body = _image_with_blobs(api)
    raw = encode(body).replace(
        b'"mediaType"', f'"mediaType": "{OCI_INDEX}", "mediaType"'.encode(), 1
    )
    return BadPush(raw, OCI_MANIFEST, {"key": "mediaType"}, "mediaType")


def _deep_objects(api: httpx.Client) -> BadPush:
    _image_with_blobs(api)
    raw = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    return BadPush(raw, OCI_MANIFEST, {"limit": MAX_NESTING}, "nests")


def _deep_arrays(api: httpx.Client) -> BadPush:
    _image_with_blobs(api)
    raw = b"[" * 100_000 + b"]" * 100_000
    return BadPush(raw, OCI_MANIFEST, {"limit": MAX_NESTING}, "nests")


def _deep_field(api: httpx.Client) -> BadPush:
    # Deep enough to pass the parser, one level past the limit.
    body = _image_with_blobs(api)
    value: Any = 1
    for _ in range(MAX_NESTING):
        value = {"a": value}
    body["extra"] = value
    return BadPush(encode(body), OCI_MANIFEST, {"limit": MAX_NESTING}, "nests")


def _layers_in_other_case(api: httpx.Client) -> BadPush:
    # Go clients read "Layers" as the layers field, with a blob the
    # repository lacks, while json.loads keeps it as another key.
    body = _image_with_blobs(api)
    missing = str(Digest.of(b"a layer that was never pushed"))
    body["Layers"] = [{**body["layers"][0], "digest": missing}]
    return BadPush(
        encode(body), OCI_MANIFEST, {"key": "Layers", "field": "layers"}, "Layers"
    )


def _infinity(api: httpx.Client) -> BadPush:
    body = _image_with_blobs(api)
    raw = encode(body)[:-1] + b', "x": Infinity}'
    return BadPush(raw, OCI_MANIFEST, {"error": "Infinity is not a JSON value"}, "JSON")


def _float_overflow(api: httpx.Client) -> BadPush:
    # Python reads 1e999 as infinity, and Go reads it as a range error.
    body = _image_with_blobs(api)
    raw = encode(body)[:-1] + b', "x": 1e999}'
    return BadPush(raw, OCI_MANIFEST, {"number": "1e999"}, "64-bit float")


def _platform_float_overflow(api: httpx.Client) -> BadPush:
    # The platform goes into the event's payload, which would then contain
    # the non-JSON literal -Infinity.
    body = _index_with_child(api, OCI_INDEX)
    body["manifests"][0]["platform"]["os.version"] = 0
    raw = encode(body).replace(b'"os.version": 0', b'"os.version": -1e999', 1)
    return BadPush(raw, OCI_INDEX, {"number": "-1e999"}, "64-bit float")


def _docker_without_media_type(api: httpx.Client) -> BadPush:
    body = _image_with_blobs(api, docker=True)
    del body["mediaType"]
    return BadPush(
        encode(body),
        DOCKER_MANIFEST,
        {"field": "mediaType", "contentType": DOCKER_MANIFEST},
        "mediaType",
    )


CASES: dict[str, Callable[[httpx.Client], BadPush]] = {
    "oci-manifest-with-manifests": _manifest_with_manifests,
    "docker-manifest-with-manifests": _docker_manifest_with_manifests,
    "untyped-both-kinds-as-manifest": _untyped_as_manifest,
    "untyped-both-kinds-as-index": _untyped_as_index,
    "oci-index-with-config": lambda api: _index_with(api, OCI_INDEX, "config"),
    "oci-index-with-layers": lambda api: _index_with(api, OCI_INDEX, "layers"),
    "docker-list-with-config": lambda api: _index_with(
        api, DOCKER_MANIFEST_LIST, "config"
    ),
    "docker-list-with-layers": lambda api: _index_with(
        api, DOCKER_MANIFEST_LIST, "layers"
    ),
    "duplicate-config-digest": _duplicate_config_digest,
    "duplicate-media-type": _duplicate_media_type,
    "objects-100000-deep": _deep_objects,
    "arrays-100000-deep": _deep_arrays,
    "field-past-nesting-limit": _deep_field,
    "layers-in-other-case": _layers_in_other_case,
    "infinity": _infinity,
    "float-overflow": _float_overflow,
    "platform-float-overflow": _platform_float_overflow,
    "docker-without-media-type": _docker_without_media_type,
}


def _events(api: httpx.Client) -> list[dict[str, Any]]:
    response = api.get("/_cairn/events?after=0&limit=1000")
    assert response.status_code == 200
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def _tags(api: httpx.Client) -> list[str]:
    response = api.get(f"/v2/{REPOSITORY}/tags/list")
    assert response.status_code == 200
    tags: list[str] = response.json()["tags"]
    return tags


@pytest.mark.parametrize("case", list(CASES))
def test_ambiguous_manifest_rejected(
    api: httpx.Client, registry: Registry, case: str
) -> None:
    bad = CASES[case](api)
    digest = Digest.of(bad.body)
    before = stored_state(registry)
    events_before = _events(api)
    tags_before = _tags(api)

    for reference in ("v1", str(digest)):
        response = api.put(
            f"/v2/{REPOSITORY}/manifests/{reference}",
            content=bad.body,
            headers={"Content-Type": bad.content_type},
        )
        assert response.status_code == 400, response.text
        errors = response.json()["errors"]
        assert len(errors) == 1
        assert errors[0]["code"] == "MANIFEST_INVALID"
        assert errors[0]["detail"] == bad.detail
        assert bad.named in errors[0]["message"]

    assert stored_state(registry) == before
    assert _events(api) == events_before
    assert _tags(api) == tags_before
    assert "v1" not in tags_before
    for reference in ("v1", str(digest)):
        path = f"/v2/{REPOSITORY}/manifests/{reference}"
        get = api.get(path)
        assert get.status_code == 404
        assert get.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        assert api.head(path).status_code == 404


def test_untyped_manifest_keeps_its_kind(api: httpx.Client) -> None:
    # An image manifest without mediaType is pushed, then the same bytes as
    # an index. The second push must not tag bytes stored as an image manifest.
    body = _image_with_blobs(api)
    del body["mediaType"]
    raw = encode(body)
    stored = api.put(
        f"/v2/{REPOSITORY}/manifests/v1",
        content=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert stored.status_code == 201, stored.text

    response = api.put(
        f"/v2/{REPOSITORY}/manifests/v2",
        content=raw,
        headers={"Content-Type": OCI_INDEX},
    )

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"] == {"field": "config", "mediaType": OCI_INDEX}
    assert _tags(api) == ["v1"]
    head = api.head(f"/v2/{REPOSITORY}/manifests/v1")
    assert head.headers["Content-Type"] == OCI_MANIFEST


def test_digest_keeps_first_media_type(api: httpx.Client, registry: Registry) -> None:
    # Bytes without mediaType are an OCI manifest, and never a Docker one.
    body = _image_with_blobs(api)
    del body["mediaType"]
    raw = encode(body)
    stored = api.put(
        f"/v2/{REPOSITORY}/manifests/v1",
        content=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert stored.status_code == 201, stored.text
    before = stored_state(registry)
    events_before = _events(api)

    response = api.put(
        f"/v2/{REPOSITORY}/manifests/v2",
        content=raw,
        headers={"Content-Type": DOCKER_MANIFEST},
    )

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"] == {"field": "mediaType", "contentType": DOCKER_MANIFEST}
    assert stored_state(registry) == before
    assert _events(api) == events_before
    assert _tags(api) == ["v1"]
    head = api.head(f"/v2/{REPOSITORY}/manifests/{Digest.of(raw)}")
    assert head.headers["Content-Type"] == OCI_MANIFEST

    again = api.put(
        f"/v2/{REPOSITORY}/manifests/v2",
        content=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert again.status_code == 201, again.text
    assert _tags(api) == ["v1", "v2"]
