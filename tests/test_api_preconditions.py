"""If-Match and If-None-Match on manifest PUT, DELETE, GET and HEAD, and on
blob GET, HEAD and DELETE.

A manifest's or blob's ETag is its digest. A false precondition gets 412 with the
reference, the field, its value and the digest the reference names now, and
stores nothing: no event, no tag change.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from engine.registry import Registry
from tests.images import Image, make_image
from tests.server import log_position, push_blob

REPO = "cond/demo"
TAG_URL = f"/v2/{REPO}/manifests/prod"


@pytest.fixture
def api(app_client: httpx.Client) -> httpx.Client:
    return app_client


@pytest.fixture
def images(api: httpx.Client) -> tuple[Image, Image]:
    """Two images whose blobs are in the repository; neither is pushed."""
    first, second = make_image(), make_image()
    for blob in (*first.blobs, *second.blobs):
        push_blob(api, REPO, blob)
    return first, second


def _put(api: httpx.Client, url: str, image: Image, **headers: str) -> httpx.Response:
    return api.put(
        url,
        content=image.manifest,
        headers={"Content-Type": image.media_type, **headers},
    )


def _quoted(image: Image) -> str:
    return f'"{image.digest}"'


def _assert_412(
    response: httpx.Response, header: str, value: str, current: str | None
) -> dict[str, Any]:
    assert response.status_code == 412, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert error["message"].startswith("precondition failed")
    assert error["detail"]["header"] == header
    assert error["detail"]["value"] == value
    assert error["detail"]["current"] == current
    assert error["detail"]["repository"] == REPO
    return dict(error["detail"])


def _tag_digest(api: httpx.Client) -> str | None:
    response = api.head(TAG_URL)
    return response.headers["Docker-Content-Digest"] if response.is_success else None


def test_create_only_tag(
    api: httpx.Client, registry: Registry, images: tuple[Image, Image]
) -> None:
    first, second = images

    created = _put(api, TAG_URL, first, **{"If-None-Match": "*"})
    assert created.status_code == 201, created.text
    before = log_position(registry)
    again = _put(api, TAG_URL, second, **{"If-None-Match": "*"})

    detail = _assert_412(again, "If-None-Match", "*", str(first.digest))
    assert detail["reference"] == "prod"
    assert _tag_digest(api) == str(first.digest)
    assert log_position(registry) == before
    assert api.head(f"/v2/{REPO}/manifests/{second.digest}").status_code == 404


def test_guarded_tag_move(
    api: httpx.Client, registry: Registry, images: tuple[Image, Image]
) -> None:
    first, second = images
    assert _put(api, TAG_URL, first).status_code == 201

    moved = _put(api, TAG_URL, second, **{"If-Match": _quoted(first)})
    assert moved.status_code == 201, moved.text
    before = log_position(registry)
    stale = _put(api, TAG_URL, first, **{"If-Match": _quoted(first)})

    _assert_412(stale, "If-Match", _quoted(first), str(second.digest))
    assert _tag_digest(api) == str(second.digest)
    assert log_position(registry) == before


def test_if_match_missing_tag_fails(
    api: httpx.Client, registry: Registry, images: tuple[Image, Image]
) -> None:
    first, _ = images

    response = _put(api, TAG_URL, first, **{"If-Match": "*"})

    _assert_412(response, "If-Match", "*", None)
    assert _tag_digest(api) is None


def test_weak_tag_fails_if_match(
    api: httpx.Client, images: tuple[Image, Image]
) -> None:
    first, second = images
    assert _put(api, TAG_URL, first).status_code == 201
    weak = f"W/{_quoted(first)}"

    response = _put(api, TAG_URL, second, **{"If-Match": weak})

    _assert_412(response, "If-Match", weak, str(first.digest))


def test_guarded_tag_delete(
    api: httpx.Client, registry: Registry, images: tuple[Image, Image]
) -> None:
    first, second = images
    assert _put(api, TAG_URL, first).status_code == 201
    before = log_position(registry)

    wrong = api.delete(TAG_URL, headers={"If-Match": _quoted(second)})
    _assert_412(wrong, "If-Match", _quoted(second), str(first.digest))
    assert _tag_digest(api) == str(first.digest)
    assert log_position(registry) == before

    right = api.delete(
        TAG_URL, headers={"If-Match": f"{_quoted(second)}, {_quoted(first)}"}
    )
    assert right.status_code == 202, right.text
    assert _tag_digest(api) is None


def test_guarded_delete_by_digest(
    api: httpx.Client, images: tuple[Image, Image]
) -> None:
    first, _ = images
    assert _put(api, TAG_URL, first).status_code == 201
    url = f"/v2/{REPO}/manifests/{first.digest}"

    rejected = api.delete(url, headers={"If-None-Match": "*"})
    _assert_412(rejected, "If-None-Match", "*", str(first.digest))
    assert api.head(url).status_code == 200

    deleted = api.delete(url, headers={"If-Match": _quoted(first)})
    assert deleted.status_code == 202, deleted.text
    assert api.head(url).status_code == 404


def test_push_by_digest_create_only(
    api: httpx.Client, images: tuple[Image, Image]
) -> None:
    first, _ = images
    url = f"/v2/{REPO}/manifests/{first.digest}"

    created = _put(api, url, first, **{"If-None-Match": "*"})
    assert created.status_code == 201, created.text
    again = _put(api, url, first, **{"If-None-Match": "*"})

    detail = _assert_412(again, "If-None-Match", "*", str(first.digest))
    assert detail["reference"] == str(first.digest)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_read_with_if_match(
    api: httpx.Client, images: tuple[Image, Image], method: str
) -> None:
    first, second = images
    assert _put(api, TAG_URL, first).status_code == 201

    matching = api.request(method, TAG_URL, headers={"If-Match": _quoted(first)})
    other = api.request(method, TAG_URL, headers={"If-Match": _quoted(second)})

    assert matching.status_code == 200
    assert other.status_code == 412
    if method == "GET":
        _assert_412(other, "If-Match", _quoted(second), str(first.digest))


@pytest.mark.parametrize(
    ("header", "value"), [("If-None-Match", "*"), ("If-Match", '"sha256:0"')]
)
def test_guard_with_tag_parameters_rejected(
    api: httpx.Client,
    registry: Registry,
    images: tuple[Image, Image],
    header: str,
    value: str,
) -> None:
    first, second = images
    assert _put(api, TAG_URL, first).status_code == 201
    before = log_position(registry)

    response = _put(
        api,
        f"/v2/{REPO}/manifests/{second.digest}?tag=prod&tag=new",
        second,
        **{header: value},
    )

    assert response.status_code == 400, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"] == {
        "header": header,
        "value": value,
        "tags": ["prod", "new"],
    }
    assert _tag_digest(api) == str(first.digest)
    assert log_position(registry) == before


# ---- blobs -----------------------------------------------------------------------


BLOB = b"a blob guarded by its entity tag"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_blob_read_with_if_match(api: httpx.Client, method: str) -> None:
    digest = push_blob(api, REPO, BLOB)
    url = f"/v2/{REPO}/blobs/{digest}"

    matching = api.request(method, url, headers={"If-Match": f'"{digest}"'})
    listed = api.request(method, url, headers={"If-Match": f'"sha256:0", "{digest}"'})
    other = api.request(method, url, headers={"If-Match": '"sha256:0"'})

    assert matching.status_code == 200
    assert listed.status_code == 200
    assert other.status_code == 412
    if method == "GET":
        assert matching.content == BLOB
        detail = _assert_412(other, "If-Match", '"sha256:0"', str(digest))
        assert detail["digest"] == str(digest)


@pytest.mark.parametrize(
    ("header", "value"),
    [("If-Match", '"sha256:0"'), ("If-None-Match", "*"), ("If-Match", 'W/"{d}"')],
)
def test_guarded_blob_delete_fails(
    api: httpx.Client, registry: Registry, header: str, value: str
) -> None:
    digest = push_blob(api, REPO, BLOB)
    value = value.replace("{d}", str(digest))
    url = f"/v2/{REPO}/blobs/{digest}"
    before = log_position(registry)

    response = api.delete(url, headers={header: value})

    _assert_412(response, header, value, str(digest))
    assert log_position(registry) == before
    assert api.get(url).content == BLOB


def test_guarded_blob_delete(api: httpx.Client) -> None:
    digest = push_blob(api, REPO, BLOB)
    url = f"/v2/{REPO}/blobs/{digest}"

    response = api.delete(
        url, headers={"If-Match": f'"{digest}"', "If-None-Match": '"sha256:0"'}
    )

    assert response.status_code == 202, response.text
    assert api.head(url).status_code == 404


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_unknown_blob_with_if_match_is_404(api: httpx.Client, method: str) -> None:
    """A request that would fail without its preconditions ignores them."""
    digest = push_blob(api, "cond/other", BLOB)

    response = api.request(
        method, f"/v2/{REPO}/blobs/{digest}", headers={"If-Match": '"sha256:0"'}
    )

    assert response.status_code == 404
