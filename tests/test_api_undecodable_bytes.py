"""Percent-encoded bytes that are not UTF-8, in the path or the query.

Each request gets the status and code that any other invalid value gets,
stores nothing, and its error detail names the value as the client sent
it: ``a%ff`` stays ``a%ff``, where a replacement character would make it
equal to ``a%fe``. Values that decode as UTF-8 are named decoded.
"""

from __future__ import annotations

import httpx
import pytest

from engine.domain.digest import Digest
from engine.registry import Registry
from tests.images import make_image
from tests.server import push_image, stored_state
from tests.test_api_bad_input import error_of

SUBJECT = str(Digest.of(b"subject"))
BLOB = str(Digest.of(b"blob"))


@pytest.fixture
def api(app_client: httpx.Client) -> httpx.Client:
    """Push demo/hello:v1 and return the client of the served registry."""
    push_image(app_client, "demo/hello", make_image(), "v1")
    return app_client


def send(api: httpx.Client, method: str, target: str) -> httpx.Response:
    """Send ``target`` with its escapes as written; httpx would otherwise
    normalize their letter case."""
    return api.request(method, httpx.URL(target))


def check_rejected_as_sent(
    api: httpx.Client,
    registry: Registry,
    method: str,
    target: str,
    status: int,
    code: str,
    key: str,
    value: str,
) -> None:
    """Send ``target`` and check its one error, which names ``value`` as sent."""
    before = stored_state(registry)

    response = send(api, method, target)

    assert response.status_code == status, response.text
    assert stored_state(registry) == before
    error = error_of(response)
    assert error["code"] == code
    assert error["detail"][key] == value
    assert "\ufffd" not in error["message"]


@pytest.mark.parametrize(
    ("method", "target", "status", "code", "key", "value"),
    [
        ("GET", "/v2/a%ff/tags/list", 400, "NAME_INVALID", "name", "a%ff"),
        (
            "GET",
            "/v2/demo/hello%FE/tags/list",
            400,
            "NAME_INVALID",
            "name",
            "demo/hello%FE",
        ),
        (
            "GET",
            "/v2/demo/hello/manifests/t%ff",
            404,
            "MANIFEST_UNKNOWN",
            "reference",
            "t%ff",
        ),
        (
            "DELETE",
            "/v2/demo/hello/manifests/t%ff",
            404,
            "MANIFEST_UNKNOWN",
            "reference",
            "t%ff",
        ),
        (
            "GET",
            "/v2/demo/hello/manifests/%C3%A9%ff",
            404,
            "MANIFEST_UNKNOWN",
            "reference",
            "é%ff",
        ),
        (
            "GET",
            "/v2/demo/hello/blobs/sha256:%ff",
            404,
            "BLOB_UNKNOWN",
            "digest",
            "sha256:%ff",
        ),
        (
            "DELETE",
            "/v2/demo/hello/blobs/sha256:%fe",
            404,
            "BLOB_UNKNOWN",
            "digest",
            "sha256:%fe",
        ),
        (
            "GET",
            "/v2/demo/hello/blobs/uploads/%ff",
            404,
            "BLOB_UPLOAD_UNKNOWN",
            "upload",
            "%ff",
        ),
        (
            "PATCH",
            "/v2/demo/hello/blobs/uploads/%e2%82",
            404,
            "BLOB_UPLOAD_UNKNOWN",
            "upload",
            "%e2%82",
        ),
        (
            "DELETE",
            "/v2/demo/hello/blobs/uploads/%ff",
            404,
            "BLOB_UPLOAD_UNKNOWN",
            "upload",
            "%ff",
        ),
        (
            "GET",
            "/v2/demo/hello/referrers/sha256:%ff",
            400,
            "DIGEST_INVALID",
            "digest",
            "sha256:%ff",
        ),
        (
            "GET",
            "/v2/demo/hello/x%ff",
            404,
            "UNSUPPORTED",
            "path",
            "/v2/demo/hello/x%ff",
        ),
        (
            "GET",
            "/_cairn/api/v1/repositories/a%ff/-/tags",
            400,
            "NAME_INVALID",
            "name",
            "a%ff",
        ),
        ("GET", "/_cairn/ui/x%ff", 404, "UNSUPPORTED", "path", "/_cairn/ui/x%ff"),
    ],
)
def test_path_value_named_as_sent(
    api: httpx.Client,
    registry: Registry,
    method: str,
    target: str,
    status: int,
    code: str,
    key: str,
    value: str,
) -> None:
    check_rejected_as_sent(api, registry, method, target, status, code, key, value)


# The detail names the value under "value", beside "parameter", except where
# a repository name or digest check of the domain raises the error.
@pytest.mark.parametrize(
    ("method", "target", "status", "code", "key", "value"),
    [
        ("GET", "/_cairn/events?after=%ff", 400, "UNSUPPORTED", "value", "%ff"),
        ("GET", "/_cairn/events?limit=1%FF", 400, "UNSUPPORTED", "value", "1%FF"),
        ("GET", "/v2/_catalog?n=%ff", 400, "UNSUPPORTED", "value", "%ff"),
        ("GET", "/v2/demo/hello/tags/list?n=2%ff", 400, "UNSUPPORTED", "value", "2%ff"),
        ("GET", "/v2/_catalog?last=%0a%ff", 400, "UNSUPPORTED", "value", "\n%ff"),
        (
            "GET",
            f"/v2/demo/hello/referrers/{SUBJECT}?artifactType=a/b%ff",
            400,
            "UNSUPPORTED",
            "value",
            "a/b%ff",
        ),
        (
            "GET",
            f"/v2/demo/hello/referrers/{SUBJECT}?cursor=%ff",
            400,
            "UNSUPPORTED",
            "value",
            "%ff",
        ),
        (
            "GET",
            "/_cairn/api/v1/repositories?prefix=a%ff",
            400,
            "UNSUPPORTED",
            "value",
            "a%ff",
        ),
        (
            "GET",
            "/_cairn/api/v1/repositories?sort=%ff",
            400,
            "UNSUPPORTED",
            "value",
            "%ff",
        ),
        ("GET", "/_cairn/api/v1/events?since=%ff", 400, "UNSUPPORTED", "value", "%ff"),
        (
            "GET",
            "/_cairn/api/v1/events?actor=%0a%ff",
            400,
            "UNSUPPORTED",
            "value",
            "\n%ff",
        ),
        (
            "GET",
            "/_cairn/api/v1/events?type=tag%ff",
            400,
            "UNSUPPORTED",
            "value",
            "tag%ff",
        ),
        (
            "GET",
            "/_cairn/api/v1/events?repository=a%ff",
            400,
            "NAME_INVALID",
            "name",
            "a%ff",
        ),
        (
            "POST",
            "/v2/demo/hello/blobs/uploads/?mount=sha256:%ff",
            400,
            "DIGEST_INVALID",
            "digest",
            "sha256:%ff",
        ),
        (
            "POST",
            f"/v2/demo/hello/blobs/uploads/?mount={BLOB}&from=a%ff",
            400,
            "NAME_INVALID",
            "name",
            "a%ff",
        ),
        (
            "POST",
            "/v2/demo/hello/blobs/uploads/?digest=sha256:%ff",
            400,
            "DIGEST_INVALID",
            "digest",
            "sha256:%ff",
        ),
    ],
)
def test_query_value_named_as_sent(
    api: httpx.Client,
    registry: Registry,
    method: str,
    target: str,
    status: int,
    code: str,
    key: str,
    value: str,
) -> None:
    check_rejected_as_sent(api, registry, method, target, status, code, key, value)


def test_unknown_parameter_named_as_sent(api: httpx.Client) -> None:
    response = send(api, "GET", "/_cairn/api/v1/repositories?x%ff=1")

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["parameter"] == "x%ff"
    assert "x%ff" in error["message"]


def test_message_quotes_value_as_sent(api: httpx.Client) -> None:
    response = send(api, "GET", "/v2/demo/hello/manifests/t%ff")

    assert response.status_code == 404
    assert "'t%ff'" in error_of(response)["message"]


def test_repeated_values_named_as_sent(api: httpx.Client) -> None:
    response = send(api, "GET", "/v2/_catalog?n=%ff&n=%fe")

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "UNSUPPORTED"
    assert error["detail"]["values"] == ["%ff", "%fe"]


def test_names_differ_by_invalid_byte(api: httpx.Client) -> None:
    """Two bytes that are not UTF-8 give two details, and names that decode
    as UTF-8, including an encoded U+FFFD, are named decoded."""
    cases = {
        "/v2/a%ff/tags/list": "a%ff",
        "/v2/a%fe/tags/list": "a%fe",
        "/v2/a%C3%A9/tags/list": "a\u00e9",
        "/v2/a%EF%BF%BD/tags/list": "a\ufffd",
    }
    names = {}
    for target in cases:
        response = send(api, "GET", target)
        assert response.status_code == 400, target
        error = error_of(response)
        assert error["code"] == "NAME_INVALID", target
        names[target] = error["detail"]["name"]

    assert names == cases


def test_last_compared_as_named(api: httpx.Client) -> None:
    response = send(api, "GET", "/v2/_catalog?last=%ff")

    assert response.status_code == 200
    assert response.json()["repositories"] == ["demo/hello"]
