"""Bad input found by trying cairn as a new user: each gets a 4xx in the OCI
error format, never a 500, and stores nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.api.app import create_app
from engine.api.manifests import MAX_QUERY_TAGS
from engine.domain.digest import Digest
from engine.domain.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from engine.registry import Registry
from tests.images import descriptor, encode, make_artifact, make_image, make_index
from tests.server import ServerThread, push_blob, push_image, running, stored_state

NINES = "9" * 5000


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    errors = response.json()["errors"]
    assert len(errors) == 1
    return errors[0]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/_catalog?n=%C2%B2",
        "/v2/_catalog?n=%D9%A3",
        "/v2/_catalog?n=%EF%BC%92",
        f"/v2/_catalog?n={NINES}",
        "/v2/_catalog?n=9223372036854775808",
        "/v2/demo/app/tags/list?n=%C2%B2",
        f"/v2/demo/app/tags/list?n={NINES}",
        "/_cairn/events?after=%C2%B2",
        f"/_cairn/events?after={NINES}",
        "/_cairn/events?limit=%C2%B2",
    ],
)
def test_counts_must_be_ascii_int64(
    api: httpx.Client, registry: Registry, path: str
) -> None:
    push_image(api, "demo/app", make_image(), "v1")
    response = api.get(path)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["value"] in path or "%" in path


@pytest.mark.parametrize(
    "header", [f"bytes={NINES}-", f"bytes=-{NINES}", f"bytes=0-{NINES}"]
)
def test_huge_range_is_ignored(api: httpx.Client, header: str) -> None:
    data = b"range me"
    digest = push_blob(api, "demo/app", data)
    for method in ("GET", "HEAD"):
        response = api.request(
            method, f"/v2/demo/app/blobs/{digest}", headers={"Range": header}
        )
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(len(data))


def test_huge_content_range_is_416(api: httpx.Client, registry: Registry) -> None:
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    response = api.patch(
        location, content=b"abc", headers={"Content-Range": f"0-{NINES}"}
    )
    assert response.status_code == 416
    assert error_of(response)["code"] == "BLOB_UPLOAD_INVALID"
    assert response.headers["Range"] == "0-0"


def _manifest_with(registry: Registry, api: httpx.Client, **changes: Any) -> bytes:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "demo/app", blob)
    body = json.loads(image.manifest)
    body.update(changes)
    return encode(body)


def _layer_size(api: httpx.Client, registry: Registry, size: Any) -> bytes:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "demo/app", blob)
    body = json.loads(image.manifest)
    body["layers"][0]["size"] = size
    return encode(body)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda r, a: _layer_size(a, r, 2**64), "18446744073709551616"),
        (lambda r, a: _layer_size(a, r, 2**63), "9223372036854775808"),
        (lambda r, a: _layer_size(a, r, 999), "size does not match"),
        (lambda r, a: _manifest_with(r, a, schemaVersion=2.0), "schemaVersion"),
        (lambda r, a: _manifest_with(r, a, annotations={"k": "a\u0000b"}), "NUL"),
        (lambda r, a: _manifest_with(r, a, extra=int(NINES[:4000])), "64-bit"),
        (lambda r, a: b"[" * 100_000 + b"]" * 100_000, "nests"),
        (lambda r, a: b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nests"),
        (
            lambda r, a: _manifest_with(r, a).replace(
                b'"schemaVersion"', b'"annotations": {"k": "\\ud800"}, "schemaVersion"'
            ),
            "surrogate",
        ),
    ],
    ids=[
        "size-2^64",
        "size-2^63",
        "size-mismatch",
        "schema-version-float",
        "nul-annotation",
        "4000-digit-number",
        "nested-arrays",
        "nested-objects",
        "lone-surrogate",
    ],
)
def test_bad_manifests_rejected(
    api: httpx.Client, registry: Registry, build: Any, message: str
) -> None:
    body = build(registry, api)
    before = stored_state(registry)
    digest = Digest.of(body)
    for reference in ("v1", str(digest)):
        response = api.put(
            f"/v2/demo/app/manifests/{reference}",
            content=body,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert error["code"] in ("MANIFEST_INVALID", "DIGEST_INVALID")
        assert message in error["message"] + json.dumps(error["detail"])
    assert stored_state(registry) == before


def test_text_plain_content_type_rejected(
    api: httpx.Client, registry: Registry
) -> None:
    body = _manifest_with(registry, api)
    before = stored_state(registry)
    response = api.put(
        "/v2/demo/app/manifests/v1",
        content=body,
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"]["contentType"] == "text/plain"
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    "path",
    [
        "/v2/_catalog",
        "/v2/demo/app/tags/list",
        f"/v2/demo/app/referrers/{Digest.of(b'x')}",
        "/_cairn/events",
        "/_cairn/health",
    ],
)
def test_head_answers_where_get_does(api: httpx.Client, path: str) -> None:
    push_image(api, "demo/app", make_image(), "v1")
    head = api.head(path)
    get = api.get(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""


def test_encoded_slash_in_name_rejected(api: httpx.Client) -> None:
    push_image(api, "demo/hello", make_image(), "v1")
    response = api.get(httpx.URL("/v2/demo%2Fhello/tags/list"))
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "NAME_INVALID"
    assert "%2F" in error["detail"]["path"]


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/v2/demo/hello%0A/tags/list", "demo/hello\n"),
        ("GET", "/v2/demo%0A/hello/manifests/v1", "demo\n/hello"),
        ("POST", "/v2/demo/hello%0D/blobs/uploads/", "demo/hello\r"),
        (
            "GET",
            f"/v2/demo/hello%0A/referrers/{Digest.of(b'subject')}",
            "demo/hello\n",
        ),
        ("GET", "/_cairn/api/v1/repositories/demo/hello%0A/-/tags", "demo/hello\n"),
    ],
)
def test_control_character_in_name_rejected(
    api: httpx.Client, registry: Registry, method: str, path: str, name: str
) -> None:
    push_image(api, "demo/hello", make_image(), "v1")
    before = stored_state(registry)

    response = api.request(method, path)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "NAME_INVALID"
    assert error["detail"]["name"] == name
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    "url", ["", "/layer", "file:///etc/passwd", "ftp://example.invalid/layer"]
)
def test_foreign_layer_bad_url_stores_nothing(
    api: httpx.Client, registry: Registry, url: str
) -> None:
    # A foreign layer is stored without its blob, so an empty or relative URL
    # would leave a layer that no client can fetch, and a URL of another
    # scheme than http or https would send clients elsewhere.
    image = make_image()
    push_image(api, "demo/app", image, "v1")
    body = json.loads(image.manifest)
    body["layers"].append(
        {
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": str(Digest.of(b"a layer no registry holds")),
            "size": 25,
            "urls": [url],
        }
    )
    before = stored_state(registry)

    response = api.put(
        "/v2/demo/app/manifests/v2",
        content=encode(body),
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"] == {"field": "layers[1].urls[0]", "url": url}
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    "url", ["http://example.invalid/layer", "https://example.invalid/layer"]
)
def test_foreign_layer_http_url_stored(
    api: httpx.Client, registry: Registry, url: str
) -> None:
    image = make_image()
    push_image(api, "demo/app", image, "v1")
    body = json.loads(image.manifest)
    body["layers"].append(
        {
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": str(Digest.of(b"a layer no registry holds")),
            "size": 25,
            "urls": [url],
        }
    )
    manifest = encode(body)

    response = api.put(
        "/v2/demo/app/manifests/v2",
        content=manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 201, response.text
    pulled = api.get("/v2/demo/app/manifests/v2", headers={"Accept": OCI_MANIFEST})
    assert pulled.content == manifest


def _put_manifest(api: httpx.Client, body: bytes, media_type: str) -> httpx.Response:
    return api.put(
        f"/v2/demo/app/manifests/{Digest.of(body)}",
        content=body,
        headers={"Content-Type": media_type},
    )


@pytest.mark.parametrize(
    "child_type",
    [OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, "application/octet-stream"],
)
def test_index_child_media_type_mismatch(
    api: httpx.Client, registry: Registry, child_type: str
) -> None:
    image = make_image()
    push_image(api, "demo/app", image, "v1")
    body = json.loads(make_index([image]))
    body["manifests"][0]["mediaType"] = child_type
    index = encode(body)
    before = stored_state(registry)

    response = _put_manifest(api, index, OCI_INDEX)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"]["digest"] == str(image.digest)
    assert error["detail"]["mediaType"] == child_type
    assert error["detail"]["storedMediaType"] == OCI_MANIFEST
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("size", 3), ("mediaType", OCI_INDEX), ("mediaType", DOCKER_MANIFEST)],
)
def test_subject_descriptor_mismatch(
    api: httpx.Client, registry: Registry, field: str, value: Any
) -> None:
    image = make_image()
    push_image(api, "demo/app", image, "v1")
    artifact = make_artifact(image, "application/vnd.example.sbom", b"sbom")
    for blob in artifact.blobs:
        push_blob(api, "demo/app", blob)
    body = json.loads(artifact.manifest)
    body["subject"][field] = value
    manifest = encode(body)
    before = stored_state(registry)

    response = _put_manifest(api, manifest, OCI_MANIFEST)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"]["digest"] == str(image.digest)
    assert value in error["detail"].values()
    assert stored_state(registry) == before
    referrers = api.get(f"/v2/demo/app/referrers/{image.digest}").json()
    assert referrers["manifests"] == []


def test_subject_not_stored_is_accepted(api: httpx.Client) -> None:
    # The subject may be pushed after its referrer, so only a stored subject
    # can be compared with its descriptor.
    subject = descriptor(OCI_MANIFEST, b"a manifest pushed later")
    artifact = make_artifact(b"a manifest pushed later", "application/x.sig", b"s")
    for blob in artifact.blobs:
        push_blob(api, "demo/app", blob)
    body = json.loads(artifact.manifest)
    assert body["subject"] == subject

    response = _put_manifest(api, artifact.manifest, OCI_MANIFEST)

    assert response.status_code == 201, response.text
    assert response.headers["OCI-Subject"] == subject["digest"]


@pytest.mark.parametrize(
    ("path", "name", "values"),
    [
        ("/v2/demo/app/tags/list?n=1&n=2", "n", ["1", "2"]),
        ("/v2/demo/app/tags/list?last=a&last=b&last=c", "last", ["a", "b", "c"]),
        ("/v2/_catalog?n=1&n=1", "n", ["1", "1"]),
        ("/v2/_catalog?last=a&last=", "last", ["a", ""]),
        (
            f"/v2/demo/app/referrers/{Digest.of(b'x')}?artifactType=a&artifactType=b",
            "artifactType",
            ["a", "b"],
        ),
    ],
)
def test_repeated_listing_parameter_rejected(
    api: httpx.Client, path: str, name: str, values: list[str]
) -> None:
    push_image(api, "demo/app", make_image(), "v1")

    response = api.get(path)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == name
    assert error["detail"]["values"] == values
    assert "given once" in error["message"]
    for value in values:
        assert repr(value) in error["message"]


def test_referrers_empty_artifact_type_rejected(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "demo/app", image, "v1")

    response = api.get(
        f"/v2/demo/app/referrers/{image.digest}", params={"artifactType": ""}
    )

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"] == {"parameter": "artifactType", "value": ""}


@pytest.mark.parametrize(
    ("query", "value"),
    [
        # An unencoded "+" arrives as a space.
        (
            "artifactType=application/vnd.example.sbom+json",
            "application/vnd.example.sbom json",
        ),
        ("artifactType=sbom", "sbom"),
        ("artifactType=application/", "application/"),
    ],
)
def test_referrers_invalid_artifact_type_rejected(
    api: httpx.Client, query: str, value: str
) -> None:
    image = make_image()
    push_image(api, "demo/app", image, "v1")
    artifact = make_artifact(image, "application/vnd.example.sbom+json", b"sbom")
    for blob in artifact.blobs:
        push_blob(api, "demo/app", blob)
    pushed = _put_manifest(api, artifact.manifest, OCI_MANIFEST)
    assert pushed.status_code == 201, pushed.text

    response = api.get(httpx.URL(f"/v2/demo/app/referrers/{image.digest}?{query}"))

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"] == {"parameter": "artifactType", "value": value}
    assert "%2B" in error["message"]
    encoded = api.get(
        f"/v2/demo/app/referrers/{image.digest}",
        params={"artifactType": "application/vnd.example.sbom+json"},
    )
    assert [m["digest"] for m in encoded.json()["manifests"]] == [
        str(Digest.of(artifact.manifest))
    ]


def test_repeated_digest_on_upload_rejected(
    api: httpx.Client, registry: Registry
) -> None:
    data = b"blob sent with two digests"
    digest = str(Digest.of(data))
    other = str(Digest.of(b"another blob"))
    location = api.post("/v2/demo/app/blobs/uploads/").headers["Location"]
    before = stored_state(registry)

    for query in (f"digest={digest}&digest={other}", f"digest={other}&digest={digest}"):
        finished = api.put(f"{location}?{query}", content=data)
        assert finished.status_code == 400, finished.text
        error = error_of(finished)
        assert error["code"] == "UNSUPPORTED"
        assert error["detail"]["parameter"] == "digest"
        assert error["detail"]["values"] == [
            part.split("=", 1)[1] for part in query.split("&")
        ]

        monolithic = api.post(f"/v2/demo/app/blobs/uploads/?{query}", content=data)
        assert monolithic.status_code == 400, monolithic.text
        assert error_of(monolithic)["detail"]["parameter"] == "digest"

    assert stored_state(registry) == before
    # The session is still open, so the client can finish it with one digest.
    assert api.get(location).status_code == 204
    finished = api.put(location, params={"digest": digest}, content=data)
    assert finished.status_code == 201, finished.text


@pytest.mark.parametrize(
    "query",
    [
        "mount={digest}&mount={digest}&from=demo/app",
        "mount={digest}&from=demo/app&from=demo/other",
    ],
)
def test_repeated_mount_parameter_rejected(
    api: httpx.Client, registry: Registry, query: str
) -> None:
    digest = push_blob(api, "demo/app", b"mounted blob")
    push_blob(api, "demo/other", b"mounted blob")
    before = stored_state(registry)

    response = api.post(f"/v2/demo/copy/blobs/uploads/?{query.format(digest=digest)}")

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "UNSUPPORTED"
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    "tags", [["-bad"], [""], ["ok", "-bad"], ["ok", "x" * 129], ["ok", "a b"]]
)
def test_invalid_query_tag_stores_nothing(
    api: httpx.Client, registry: Registry, tags: list[str]
) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "demo/app", blob)
    before = stored_state(registry)

    response = api.put(
        f"/v2/demo/app/manifests/{image.digest}",
        params=[("tag", tag) for tag in tags],
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"] == {"parameter": "tag", "tag": tags[-1]}
    assert "OCI-Tag" not in response.headers
    assert stored_state(registry) == before
    assert api.get(f"/v2/demo/app/manifests/{image.digest}").status_code == 404


@pytest.mark.parametrize("query", ["tag=v2", "tag=", "tag=v2&tag=v3"])
def test_query_tag_on_push_by_tag_rejected(
    api: httpx.Client, registry: Registry, query: str
) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "demo/app", blob)
    before = stored_state(registry)

    response = api.put(
        f"/v2/demo/app/manifests/v1?{query}",
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == "tag"
    assert error["detail"]["values"] == [v.split("=", 1)[1] for v in query.split("&")]
    assert stored_state(registry) == before


def test_too_many_query_tags_414(api: httpx.Client, registry: Registry) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "demo/app", blob)
    before = stored_state(registry)
    tags = [f"t{i}" for i in range(MAX_QUERY_TAGS + 1)]

    response = api.put(
        f"/v2/demo/app/manifests/{image.digest}",
        params=[("tag", tag) for tag in tags],
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )

    assert response.status_code == 414
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["count"] == MAX_QUERY_TAGS + 1
    assert error["detail"]["limit"] == MAX_QUERY_TAGS
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    ],
)
@pytest.mark.parametrize("docker", [False, True])
def test_schema1_content_type_with_schema2_body(
    api: httpx.Client, registry: Registry, content_type: str, docker: bool
) -> None:
    image = make_image(docker=docker)
    for blob in image.blobs:
        push_blob(api, "demo/app", blob)
    before = stored_state(registry)

    response = _put_manifest(api, image.manifest, content_type)

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "MANIFEST_INVALID"
    assert error["detail"]["contentType"] == content_type
    assert error["detail"]["mediaType"] == image.media_type
    assert stored_state(registry) == before


@pytest.mark.parametrize(
    "query",
    [
        "after=",
        "after=0&limit=",
        "after=0&repository=",
        "after=0&type=",
        "after=0&type=tag.set&type=",
        "after=0&type=,",
    ],
)
def test_feed_empty_parameter_rejected(api: httpx.Client, query: str) -> None:
    # An empty value often comes from an unset shell variable, and read as
    # absent it would replay the whole log or widen the filter to every event.
    push_image(api, "demo/app", make_image(), "v1")

    response = api.get(f"/_cairn/events?{query}")

    name, value = query.rsplit("&", 1)[-1].split("=")
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == name
    assert error["detail"]["value"] == value


@pytest.mark.parametrize("query", ["type=", "type=,", "type=tag.set&type="])
def test_query_api_empty_type_rejected(api: httpx.Client, query: str) -> None:
    push_image(api, "demo/app", make_image(), "v1")

    response = api.get(f"/_cairn/api/v1/events?{query}")

    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == "type"


@pytest.mark.parametrize(
    "host",
    [
        "[::1",
        "[::1]]",
        "[::1]:5000]",
        "a]b",
        "[zz]",
        "x:abc",
        "x:1:2",
        "x:99999",
        "x:+5",
    ],
)
def test_location_relative_for_invalid_host(api: httpx.Client, host: str) -> None:
    # An absolute URL with this authority does not parse, so clients could
    # not follow it. A path works with every client. The same value in Host
    # gets a 400 (tests/test_api_host.py).
    response = api.post(
        "/v2/demo/app/blobs/uploads/", headers={"X-Forwarded-Host": host}
    )

    assert response.status_code == 202, response.text
    assert response.headers["Location"].startswith("/v2/demo/app/blobs/uploads/")


@pytest.mark.parametrize(
    "host", ["registry.example:5000", "[::1]:5000", "[::1]", "127.0.0.1", "x:"]
)
def test_location_absolute_for_valid_host(api: httpx.Client, host: str) -> None:
    response = api.post(
        "/v2/demo/app/blobs/uploads/", headers={"X-Forwarded-Host": host}
    )

    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    assert location.startswith(f"http://{host}/v2/demo/app/blobs/uploads/")
