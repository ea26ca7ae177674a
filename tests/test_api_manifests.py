"""Manifest, tag, referrer and catalog routes over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from engine.api.app import create_app
from engine.api.listing import MAX_REFERRERS_PAGE_BYTES
from engine.domain.digest import Digest
from engine.domain.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from engine.queries.pages import encode_cursor
from engine.registry import Registry
from tests.images import Image, encode, make_artifact, make_image, make_index
from tests.server import ServerThread, push_blob, push_image, running


@pytest.fixture
def server(registry: Registry) -> Iterator[ServerThread]:
    with running(create_app(registry)) as server:
        yield server


@pytest.fixture
def api(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


# ---- push and pull ---------------------------------------------------------------


def test_manifest_put_by_tag(api: httpx.Client, server: ServerThread) -> None:
    image = make_image()

    response = push_image(api, "library/app", image, "v1")

    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == str(image.digest)
    assert response.headers["Location"] == (
        f"{server.url}/v2/library/app/manifests/{image.digest}"
    )
    assert "OCI-Subject" not in response.headers


@pytest.mark.parametrize("reference", ["v1", "digest"])
def test_manifest_get_and_head(api: httpx.Client, reference: str) -> None:
    image = make_image(2)
    push_image(api, "library/app", image, "v1")
    if reference == "digest":
        reference = str(image.digest)

    get = api.get(f"/v2/library/app/manifests/{reference}")
    head = api.head(f"/v2/library/app/manifests/{reference}")

    assert get.status_code == 200
    assert get.content == image.manifest
    assert get.headers["Content-Type"] == OCI_MANIFEST
    assert get.headers["Docker-Content-Digest"] == str(image.digest)
    assert get.headers["Content-Length"] == str(len(image.manifest))
    assert get.headers["ETag"] == f'"{image.digest}"'
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(image.manifest))
    assert head.headers["Docker-Content-Digest"] == str(image.digest)
    assert head.headers["Content-Type"] == OCI_MANIFEST


def test_manifest_put_by_digest(api: httpx.Client) -> None:
    image = make_image(docker=True)
    for blob in image.blobs:
        push_blob(api, "library/app", blob)

    response = api.put(
        f"/v2/library/app/manifests/{image.digest}",
        content=image.manifest,
        headers={"Content-Type": DOCKER_MANIFEST},
    )

    assert response.status_code == 201
    fetched = api.get(f"/v2/library/app/manifests/{image.digest}")
    assert fetched.headers["Content-Type"] == DOCKER_MANIFEST
    assert fetched.content == image.manifest


def _push_blobs(api: httpx.Client, repository: str, image: Image) -> None:
    for blob in image.blobs:
        push_blob(api, repository, blob)


def _put_by_digest(
    api: httpx.Client, image: Image, params: list[tuple[str, str]]
) -> httpx.Response:
    return api.put(
        f"/v2/library/app/manifests/{image.digest}",
        params=params,
        content=image.manifest,
        headers={"Content-Type": image.media_type},
    )


def _tag_events(api: httpx.Client) -> list[dict[str, Any]]:
    response = api.get("/_cairn/events", params={"repository": "library/app"})
    assert response.status_code == 200, response.text
    return [e for e in response.json()["events"] if e["type"] == "tag.set"]


def test_manifest_put_by_digest_sets_query_tags(api: httpx.Client) -> None:
    image = make_image()
    _push_blobs(api, "library/app", image)

    response = _put_by_digest(
        api, image, [("tag", "1.2.3"), ("tag", "latest"), ("tag", "1.2.3")]
    )

    assert response.status_code == 201, response.text
    assert response.headers.get_list("OCI-Tag") == ["1.2.3", "latest"]
    for tag in ("1.2.3", "latest"):
        fetched = api.get(f"/v2/library/app/manifests/{tag}")
        assert fetched.status_code == 200
        assert fetched.headers["Docker-Content-Digest"] == str(image.digest)
    events = _tag_events(api)
    assert [e["payload"]["tag"] for e in events] == ["1.2.3", "latest"]


def test_query_tags_move_existing_tag(api: httpx.Client) -> None:
    first, second = make_image(), make_image()
    push_image(api, "library/app", first, "latest")
    _push_blobs(api, "library/app", second)

    response = _put_by_digest(api, second, [("tag", "latest"), ("tag", "v2")])

    assert response.status_code == 201, response.text
    assert response.headers.get_list("OCI-Tag") == ["latest", "v2"]
    fetched = api.get("/v2/library/app/manifests/latest")
    assert fetched.headers["Docker-Content-Digest"] == str(second.digest)


def test_query_tags_already_set_append_nothing(api: httpx.Client) -> None:
    image = make_image()
    _push_blobs(api, "library/app", image)
    assert _put_by_digest(api, image, [("tag", "a")]).status_code == 201
    before = api.get("/_cairn/events").json()["head"]

    response = _put_by_digest(api, image, [("tag", "a")])

    assert response.status_code == 201
    assert response.headers.get_list("OCI-Tag") == ["a"]
    assert api.get("/_cairn/events").json()["head"] == before


def test_put_without_query_tags_no_oci_tag(api: httpx.Client) -> None:
    image = make_image()

    response = push_image(api, "library/app", image)

    assert "OCI-Tag" not in response.headers


def test_sha512_manifest(api: httpx.Client) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "library/app", blob)
    digest = Digest.of(image.manifest, "sha512")

    response = api.put(
        f"/v2/library/app/manifests/{digest}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )

    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == str(digest)
    fetched = api.get(f"/v2/library/app/manifests/{digest}")
    assert fetched.status_code == 200
    assert fetched.content == image.manifest
    assert api.delete(f"/v2/library/app/manifests/{digest}").status_code == 202


def test_sha512_subject_referrers(api: httpx.Client) -> None:
    image = make_image()
    for blob in image.blobs:
        push_blob(api, "library/app", blob)
    subject_digest = Digest.of(image.manifest, "sha512")
    api.put(
        f"/v2/library/app/manifests/{subject_digest}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    artifact = json.loads(
        make_artifact(image, "application/vnd.example.sbom.v1", b"sbom").manifest
    )
    artifact["subject"]["digest"] = str(subject_digest)
    raw = encode(artifact)
    for blob in (b"{}", b"sbom"):
        push_blob(api, "library/app", blob)

    pushed = api.put(
        f"/v2/library/app/manifests/{Digest.of(raw, 'sha512')}",
        content=raw,
        headers={"Content-Type": OCI_MANIFEST},
    )
    listed = api.get(f"/v2/library/app/referrers/{subject_digest}")

    assert pushed.status_code == 201
    assert pushed.headers["OCI-Subject"] == str(subject_digest)
    manifests = listed.json()["manifests"]
    assert [m["digest"] for m in manifests] == [str(Digest.of(raw, "sha512"))]


def test_manifest_if_none_match(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")

    response = api.get(
        "/v2/library/app/manifests/v1", headers={"If-None-Match": f'"{image.digest}"'}
    )

    assert response.status_code == 304


def test_retag_moves_tag(api: httpx.Client) -> None:
    first, second = make_image(), make_image()
    push_image(api, "library/app", first, "latest")
    push_image(api, "library/app", second, "latest")

    response = api.get("/v2/library/app/manifests/latest")

    assert response.headers["Docker-Content-Digest"] == str(second.digest)


# ---- content negotiation -----------------------------------------------------------


def _push_index(api: httpx.Client, media_type: str = OCI_INDEX) -> tuple[bytes, list]:
    amd64, arm64 = make_image(docker=True), make_image(docker=True)
    push_image(api, "library/multi", amd64)
    push_image(api, "library/multi", arm64)
    index = json.loads(
        make_index(
            [amd64, arm64],
            [
                {"architecture": "amd64", "os": "linux"},
                {"architecture": "arm64", "os": "linux"},
            ],
        )
    )
    index["mediaType"] = media_type
    raw = encode(index)
    response = api.put(
        "/v2/library/multi/manifests/latest",
        content=raw,
        headers={"Content-Type": media_type},
    )
    assert response.status_code == 201, response.text
    return raw, [amd64, arm64]


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "*/*",
        f"{OCI_INDEX}, {OCI_MANIFEST}",
        f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {OCI_INDEX}",
        f"{OCI_INDEX};q=0.5",
    ],
)
def test_index_served_as_stored(api: httpx.Client, accept: str | None) -> None:
    raw, _ = _push_index(api)
    headers = {"Accept": accept} if accept else {}

    response = api.get("/v2/library/multi/manifests/latest", headers=headers)

    assert response.content == raw
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.headers["Docker-Content-Digest"] == str(Digest.of(raw))


@pytest.mark.parametrize("index_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
def test_index_resolved_for_client_without_index_support(
    api: httpx.Client, index_type: str
) -> None:
    _, (amd64, _) = _push_index(api, index_type)

    response = api.get(
        "/v2/library/multi/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
    )

    assert response.content == amd64.manifest
    assert response.headers["Content-Type"] == DOCKER_MANIFEST
    assert response.headers["Docker-Content-Digest"] == str(amd64.digest)
    assert response.headers["Vary"] == "Accept"


@pytest.mark.parametrize(
    "accept",
    [
        f"{OCI_INDEX};q=0, {DOCKER_MANIFEST}",
        f"{OCI_INDEX}; Q = 0.000, {DOCKER_MANIFEST};q=0.5",
        f"*/*;q=0, {DOCKER_MANIFEST}",
    ],
)
def test_index_refused_with_zero_weight(api: httpx.Client, accept: str) -> None:
    # RFC 9110 section 12.4.2: the weight 0 means "not acceptable".
    _, (amd64, _) = _push_index(api)

    response = api.get("/v2/library/multi/manifests/latest", headers={"Accept": accept})

    assert response.content == amd64.manifest
    assert response.headers["Content-Type"] == DOCKER_MANIFEST


def test_index_by_digest_never_rewritten(api: httpx.Client) -> None:
    raw, _ = _push_index(api)

    response = api.get(
        f"/v2/library/multi/manifests/{Digest.of(raw)}",
        headers={"Accept": DOCKER_MANIFEST},
    )

    assert response.content == raw
    assert "Vary" not in response.headers


def test_index_served_when_no_entry_fits(api: httpx.Client) -> None:
    raw, _ = _push_index(api)

    response = api.get(
        "/v2/library/multi/manifests/latest", headers={"Accept": OCI_MANIFEST}
    )

    assert response.content == raw
    assert response.headers["Content-Type"] == OCI_INDEX


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_index_served_when_entry_deleted(api: httpx.Client, method: str) -> None:
    raw, (amd64, _) = _push_index(api)
    deleted = api.delete(f"/v2/library/multi/manifests/{amd64.digest}")
    assert deleted.status_code == 202, deleted.text

    response = api.request(
        method,
        "/v2/library/multi/manifests/latest",
        headers={"Accept": DOCKER_MANIFEST},
    )

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.headers["Docker-Content-Digest"] == str(Digest.of(raw))
    if method == "GET":
        assert response.content == raw


def test_oci_manifest_served_to_docker_only_accept(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")

    response = api.get(
        "/v2/library/app/manifests/v1", headers={"Accept": DOCKER_MANIFEST}
    )

    assert response.status_code == 200
    assert response.headers["Content-Type"] == OCI_MANIFEST


# ---- deletes ---------------------------------------------------------------------


def test_delete_tag_keeps_manifest(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")

    response = api.delete("/v2/library/app/manifests/v1")

    assert response.status_code == 202
    assert api.get("/v2/library/app/manifests/v1").status_code == 404
    assert api.get(f"/v2/library/app/manifests/{image.digest}").status_code == 200


def test_delete_manifest_by_digest(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")

    response = api.delete(f"/v2/library/app/manifests/{image.digest}")

    assert response.status_code == 202
    assert api.get(f"/v2/library/app/manifests/{image.digest}").status_code == 404
    missing_tag = api.get("/v2/library/app/manifests/v1")
    assert missing_tag.status_code == 404
    assert missing_tag.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert api.get("/v2/library/app/tags/list").json()["tags"] == []


# ---- referrers ---------------------------------------------------------------------


def _push_artifact(
    api: httpx.Client,
    subject_manifest: bytes,
    kind: str,
    payload: bytes | None = None,
    annotations: dict[str, str] | None = None,
) -> bytes:
    artifact = make_artifact(
        subject_manifest, kind, payload or kind.encode(), annotations
    )
    for blob in artifact.blobs:
        push_blob(api, "library/app", blob)
    response = api.put(
        f"/v2/library/app/manifests/{artifact.digest}",
        content=artifact.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert response.status_code == 201
    assert response.headers["OCI-Subject"] == str(Digest.of(subject_manifest))
    return artifact.manifest


def test_referrers(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    sbom = _push_artifact(api, image.manifest, "application/vnd.example.sbom.v1")
    signature = _push_artifact(api, image.manifest, "application/vnd.example.sig.v1")

    response = api.get(f"/v2/library/app/referrers/{image.digest}")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in response.headers
    index = response.json()
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in index["manifests"]] == [
        str(Digest.of(sbom)),
        str(Digest.of(signature)),
    ]
    first = index["manifests"][0]
    assert first["artifactType"] == "application/vnd.example.sbom.v1"
    assert first["mediaType"] == OCI_MANIFEST
    assert first["size"] == len(sbom)
    assert first["annotations"] == {
        "org.opencontainers.image.created": "2026-01-01T00:00:00Z"
    }


def test_referrers_filter(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    _push_artifact(api, image.manifest, "application/vnd.example.sbom.v1")
    signature = _push_artifact(api, image.manifest, "application/vnd.example.sig.v1")

    response = api.get(
        f"/v2/library/app/referrers/{image.digest}",
        params={"artifactType": "application/vnd.example.sig.v1"},
    )

    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    manifests = response.json()["manifests"]
    assert [m["digest"] for m in manifests] == [str(Digest.of(signature))]


def test_referrers_subject_pushed_later(api: httpx.Client) -> None:
    image = make_image()
    _push_artifact(api, image.manifest, "application/vnd.example.sbom.v1")

    response = api.get(f"/v2/library/app/referrers/{image.digest}")

    assert len(response.json()["manifests"]) == 1


@pytest.mark.parametrize("repository", ["library/app", "library/never-pushed"])
def test_referrers_empty(api: httpx.Client, repository: str) -> None:
    response = api.get(f"/v2/{repository}/referrers/{Digest.of(b'nothing')}")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.json() == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [],
    }


SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.sig.v1"


def _push_referrers(
    api: httpx.Client, subject_manifest: bytes, kinds: list[str]
) -> list[str]:
    """Push one artifact per entry of ``kinds`` and return their digests."""
    digests = []
    for number, kind in enumerate(kinds):
        manifest = _push_artifact(
            api, subject_manifest, kind, f"{kind} {number}".encode()
        )
        digests.append(str(Digest.of(manifest)))
    return digests


def _next_url(response: httpx.Response) -> str | None:
    link = response.headers.get("Link")
    if link is None:
        return None
    assert link.startswith("<")
    assert link.endswith('>; rel="next"')
    return link[1 : link.index(">")]


def _walk(api: httpx.Client, url: str) -> list[httpx.Response]:
    """GET ``url`` and every page its Link headers lead to."""
    pages = []
    next_url: str | None = url
    while next_url is not None:
        response = api.get(next_url)
        assert response.status_code == 200, response.text
        pages.append(response)
        next_url = _next_url(response)
        assert len(pages) <= 100, "the Link headers do not end"
    return pages


def _digests(page: httpx.Response) -> list[str]:
    return [m["digest"] for m in page.json()["manifests"]]


def test_referrers_pagination_walk(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    pushed = _push_referrers(api, image.manifest, [SBOM] * 5)

    pages = _walk(api, f"/v2/library/app/referrers/{image.digest}?n=2")

    assert [_digests(page) for page in pages] == [pushed[:2], pushed[2:4], pushed[4:]]
    for page in pages:
        assert page.headers["Content-Type"] == OCI_INDEX
        assert page.json()["schemaVersion"] == 2
        assert page.json()["mediaType"] == OCI_INDEX
        assert "OCI-Filters-Applied" not in page.headers


def test_referrers_link_format(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    _push_referrers(api, image.manifest, [SBOM] * 3)

    response = api.get(f"/v2/library/app/referrers/{image.digest}", params={"n": 2})

    prefix = f"</v2/library/app/referrers/{image.digest}?n=2&cursor="
    assert response.headers["Link"].startswith(prefix)
    assert response.headers["Link"].endswith('>; rel="next"')


def test_referrers_one_page_has_no_link(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    pushed = _push_referrers(api, image.manifest, [SBOM] * 2)

    exact = api.get(f"/v2/library/app/referrers/{image.digest}", params={"n": 2})
    default = api.get(f"/v2/library/app/referrers/{image.digest}")

    assert _digests(exact) == pushed
    assert "Link" not in exact.headers
    assert _digests(default) == pushed
    assert "Link" not in default.headers


def test_referrers_filter_with_pagination(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    pushed = _push_referrers(
        api, image.manifest, [SBOM, SIGNATURE, SBOM, SIGNATURE, SIGNATURE, SBOM]
    )
    signatures = [pushed[1], pushed[3], pushed[4]]

    pages = _walk(
        api,
        f"/v2/library/app/referrers/{image.digest}"
        "?artifactType=application/vnd.example.sig.v1&n=2",
    )

    assert [_digests(page) for page in pages] == [signatures[:2], signatures[2:]]
    assert "artifactType=application%2Fvnd.example.sig.v1" in pages[0].headers["Link"]
    for page in pages:
        assert page.headers["Content-Type"] == OCI_INDEX
        assert page.headers["OCI-Filters-Applied"] == "artifactType"
        assert {m["artifactType"] for m in page.json()["manifests"]} == {SIGNATURE}


def test_referrers_walk_while_pushing_and_deleting(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    pushed = _push_referrers(api, image.manifest, [SBOM] * 4)

    first = api.get(f"/v2/library/app/referrers/{image.digest}", params={"n": 2})
    # Between two pages: a referrer on the first page is deleted, and a new
    # one is pushed. Neither may make the walk skip or repeat a referrer.
    deleted = api.delete(f"/v2/library/app/manifests/{pushed[0]}")
    assert deleted.status_code == 202
    (late,) = _push_referrers(api, image.manifest, [SIGNATURE])
    next_url = _next_url(first)
    assert next_url is not None
    rest = _walk(api, next_url)

    assert _digests(first) == pushed[:2]
    assert [digest for page in rest for digest in _digests(page)] == [
        *pushed[2:],
        late,
    ]


def test_referrers_page_ends_at_byte_limit(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    kilobyte = 1024
    sizes = [600 * kilobyte, 600 * kilobyte, 1100 * kilobyte, 10]
    pushed = []
    for number, size in enumerate(sizes):
        manifest = _push_artifact(
            api,
            image.manifest,
            SBOM,
            payload=f"sbom {number}".encode(),
            annotations={"org.example.padding": "x" * size},
        )
        pushed.append(str(Digest.of(manifest)))

    pages = _walk(api, f"/v2/library/app/referrers/{image.digest}")

    # The third referrer is larger than MAX_REFERRERS_PAGE_BYTES alone, so
    # it gets a page of its own rather than none.
    assert [_digests(page) for page in pages] == [[digest] for digest in pushed]
    assert len(pages[0].content) <= MAX_REFERRERS_PAGE_BYTES
    assert len(pages[1].content) <= MAX_REFERRERS_PAGE_BYTES
    assert len(pages[2].content) > MAX_REFERRERS_PAGE_BYTES


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "!!!!",
        encode_cursor("7"),
        encode_cursor(-1),
        encode_cursor(1, 2),
        encode_cursor(True),
        encode_cursor(2**63),
        # A log position alone, without the hash of its listing.
        encode_cursor(7),
        encode_cursor(7, "a" * 32, "extra"),
    ],
)
def test_referrers_invalid_cursor(api: httpx.Client, cursor: str) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")

    response = api.get(
        f"/v2/library/app/referrers/{image.digest}", params={"cursor": cursor}
    )

    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert "cursor" in error["message"]
    assert error["detail"] == {"parameter": "cursor", "value": cursor}


@pytest.mark.parametrize(
    ("target_repository", "target_subject", "source_type", "target_type"),
    [
        pytest.param("library/app", "other", None, None, id="other-subject"),
        pytest.param("library/other", "same", None, None, id="other-repository"),
        pytest.param("library/app", "same", None, SBOM, id="artifactType-added"),
        pytest.param("library/app", "same", SBOM, None, id="artifactType-removed"),
        pytest.param("library/app", "same", SBOM, SIGNATURE, id="other-artifactType"),
    ],
)
def test_referrers_cursor_of_other_listing(
    api: httpx.Client,
    target_repository: str,
    target_subject: str,
    source_type: str | None,
    target_type: str | None,
) -> None:
    image = make_image()
    other_image = make_image()
    push_image(api, "library/app", image, "v1")
    push_image(api, "library/app", other_image, "v2")
    push_image(api, "library/other", image, "v1")
    _push_referrers(api, image.manifest, [SBOM, SIGNATURE, SBOM, SIGNATURE])
    _push_referrers(api, other_image.manifest, [SBOM, SIGNATURE, SBOM, SIGNATURE])

    source_path = f"/v2/library/app/referrers/{image.digest}"
    source_params: dict[str, str | int] = {"n": 1}
    if source_type is not None:
        source_params["artifactType"] = source_type
    first = api.get(source_path, params=source_params)
    assert first.status_code == 200
    next_url = _next_url(first)
    assert next_url is not None
    cursor = parse_qs(urlsplit(next_url).query)["cursor"][0]

    # The cursor continues the listing it came from.
    own = api.get(source_path, params={**source_params, "cursor": cursor})
    assert own.status_code == 200, own.text

    subject = image.digest if target_subject == "same" else other_image.digest
    target_params: dict[str, str | int] = {"n": 1, "cursor": cursor}
    if target_type is not None:
        target_params["artifactType"] = target_type
    response = api.get(
        f"/v2/{target_repository}/referrers/{subject}", params=target_params
    )

    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert "cursor" in error["message"]
    assert error["detail"] == {"parameter": "cursor", "value": cursor}


@pytest.mark.parametrize("n", ["0", "-1", "two", "1.5", "9223372036854775808"])
def test_referrers_invalid_n(api: httpx.Client, n: str) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")

    response = api.get(f"/v2/library/app/referrers/{image.digest}", params={"n": n})

    assert response.status_code == 400
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"] == "n must be an integer from 1 to 2^63-1"
    assert error["detail"] == {"parameter": "n", "value": n}


def test_referrers_n_above_page_limit(api: httpx.Client) -> None:
    image = make_image()
    push_image(api, "library/app", image, "v1")
    pushed = _push_referrers(api, image.manifest, [SBOM] * 3)

    response = api.get(
        f"/v2/library/app/referrers/{image.digest}", params={"n": 2**63 - 1}
    )

    assert response.status_code == 200
    assert _digests(response) == pushed
    assert "Link" not in response.headers


# ---- tags and catalog ----------------------------------------------------------------


def _tag_many(api: httpx.Client, repository: str, names: list[str]) -> None:
    image = make_image()
    push_image(api, repository, image, names[0])
    for name in names[1:]:
        response = api.put(
            f"/v2/{repository}/manifests/{name}",
            content=image.manifest,
            headers={"Content-Type": image.media_type},
        )
        assert response.status_code == 201


def test_tags_list_lexical(api: httpx.Client) -> None:
    _tag_many(api, "library/app", ["v2", "latest", "V1", "v10", "1.0"])

    response = api.get("/v2/library/app/tags/list")

    assert response.status_code == 200
    assert response.json() == {
        "name": "library/app",
        "tags": ["1.0", "V1", "latest", "v10", "v2"],
    }
    assert "Link" not in response.headers


def test_tags_list_pagination(api: httpx.Client) -> None:
    _tag_many(api, "library/app", ["a", "b", "c", "d", "e"])

    pages = []
    url: str | None = "/v2/library/app/tags/list?n=2"
    while url is not None:
        response = api.get(url)
        pages.append(response.json()["tags"])
        link = response.headers.get("Link")
        url = link[1 : link.index(">")] if link else None

    assert pages == [["a", "b"], ["c", "d"], ["e"]]


def test_tags_list_link_format(api: httpx.Client) -> None:
    _tag_many(api, "library/app", ["a", "b", "c"])

    response = api.get("/v2/library/app/tags/list", params={"n": 2})

    assert response.headers["Link"] == (
        '</v2/library/app/tags/list?n=2&last=b>; rel="next"'
    )


def test_tags_list_last(api: httpx.Client) -> None:
    _tag_many(api, "library/app", ["a", "b", "c"])

    response = api.get("/v2/library/app/tags/list", params={"last": "a"})

    assert response.json()["tags"] == ["b", "c"]


def test_tags_list_n_zero(api: httpx.Client) -> None:
    _tag_many(api, "library/app", ["a"])

    response = api.get("/v2/library/app/tags/list", params={"n": 0})

    assert response.json()["tags"] == []
    assert "Link" not in response.headers


def test_tags_list_streams_past_one_page(api: httpx.Client, registry: Registry) -> None:
    image = make_image()
    push_image(api, "library/many", image, "t0000")
    repository = registry.repository("library/many")
    names = [f"t{i:04d}" for i in range(1, 1205)]
    for name in names:
        repository.tags.tag(name, image.digest)

    response = api.get("/v2/library/many/tags/list")

    assert response.status_code == 200
    assert response.json()["tags"] == ["t0000", *names]


def test_catalog_pagination(api: httpx.Client) -> None:
    for name in ["zeta", "alpha", "mid/one", "mid/two"]:
        push_blob(api, name, name.encode())

    everything = api.get("/v2/_catalog")
    first = api.get("/v2/_catalog", params={"n": 3})
    rest = api.get(first.headers["Link"][1 : first.headers["Link"].index(">")])

    assert everything.json() == {
        "repositories": ["alpha", "mid/one", "mid/two", "zeta"]
    }
    assert first.json()["repositories"] == ["alpha", "mid/one", "mid/two"]
    assert first.headers["Link"] == '</v2/_catalog?n=3&last=mid%2Ftwo>; rel="next"'
    assert rest.json()["repositories"] == ["zeta"]
    assert "Link" not in rest.headers


def test_catalog_empty(api: httpx.Client) -> None:
    assert api.get("/v2/_catalog").json() == {"repositories": []}


def test_base_endpoint(api: httpx.Client) -> None:
    response = api.get("/v2/")

    assert response.status_code == 200
    assert response.json() == {}
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
