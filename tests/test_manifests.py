"""Manifest parsing and validation for every supported media type."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from engine.domain.digest import Digest
from engine.domain.errors import ManifestInvalid, ManifestTooLarge, ManifestUnsupported
from engine.domain.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_SIZE,
    MAX_NESTING,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    DockerManifest,
    DockerManifestList,
    ImageIndex,
    ImageManifest,
    parse_manifest,
    parse_stored_manifest,
)
from tests.images import descriptor, encode, make_artifact, make_image, make_index
from tests.older_manifests import (
    OlderManifest,
    docker_without_media_type,
    image_manifests,
    index_manifests,
)


def _image_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(make_image().manifest)
    body.update(changes)
    return body


def test_oci_manifest_references() -> None:
    image = make_image(layer_count=2)
    manifest = parse_manifest(image.manifest)
    assert isinstance(manifest, ImageManifest)
    assert manifest.digest == Digest.of(image.manifest)
    assert manifest.raw == image.manifest
    kinds = [(r.kind, r.descriptor.digest) for r in manifest.references()]
    assert kinds == [
        ("config", Digest.of(image.config)),
        ("layer", Digest.of(image.layers[0])),
        ("layer", Digest.of(image.layers[1])),
    ]


def test_docker_manifest_and_list() -> None:
    child = make_image(docker=True)
    manifest = parse_manifest(child.manifest, DOCKER_MANIFEST)
    assert isinstance(manifest, DockerManifest)
    body = json.loads(make_index([child]))
    body["mediaType"] = DOCKER_MANIFEST_LIST
    listing = parse_manifest(encode(body))
    assert isinstance(listing, DockerManifestList)
    assert [r.kind for r in listing.references()] == ["manifest"]


def test_nested_index() -> None:
    inner = make_index([make_image(), make_image()])
    outer = encode(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [descriptor(OCI_INDEX, inner)],
        }
    )
    manifest = parse_manifest(outer)
    assert isinstance(manifest, ImageIndex)
    assert manifest.references()[0].descriptor.digest == Digest.of(inner)


def test_artifact_with_subject() -> None:
    subject = make_image()
    artifact = make_artifact(subject, "application/vnd.example.sbom", b"{}")
    manifest = parse_manifest(artifact.manifest)
    assert manifest.artifact_type == "application/vnd.example.sbom"
    assert manifest.subject is not None
    assert manifest.subject.digest == subject.digest
    subject_refs = [r for r in manifest.references() if r.kind == "subject"]
    assert len(subject_refs) == 1
    assert not subject_refs[0].required


def test_artifact_type_defaults_to_config_media_type() -> None:
    manifest = parse_manifest(make_image().manifest)
    assert manifest.artifact_type == "application/vnd.oci.image.config.v1+json"


def test_empty_config_requires_artifact_type() -> None:
    body = _image_body(config=descriptor(OCI_EMPTY, b"{}"))
    with pytest.raises(ManifestInvalid, match="artifactType"):
        parse_manifest(encode(body))


def test_media_type_from_content_type() -> None:
    body = _image_body()
    del body["mediaType"]
    manifest = parse_manifest(encode(body), f"{OCI_MANIFEST}; charset=utf-8")
    assert manifest.media_type == OCI_MANIFEST


def test_media_type_from_shape() -> None:
    body = json.loads(make_index([make_image()]))
    del body["mediaType"]
    assert parse_manifest(encode(body)).media_type == OCI_INDEX


def test_media_type_mismatch_with_header() -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(make_image().manifest, DOCKER_MANIFEST)
    assert caught.value.detail["contentType"] == DOCKER_MANIFEST


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ],
)
def test_schema1_rejected(content_type: str) -> None:
    body = {"schemaVersion": 1, "name": "a", "tag": "b", "fsLayers": []}
    with pytest.raises(ManifestUnsupported, match="schema 1"):
        parse_manifest(encode(body), content_type)
    with pytest.raises(ManifestUnsupported):
        parse_manifest(encode(body))


def test_schema1_detail_names_version() -> None:
    body = {"schemaVersion": 1, "name": "a", "tag": "b", "fsLayers": []}
    with pytest.raises(ManifestUnsupported) as caught:
        parse_manifest(encode(body), OCI_MANIFEST)
    assert caught.value.detail == {"schemaVersion": 1}


def test_schema1_media_type_detail() -> None:
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    body = {"schemaVersion": 2, "mediaType": schema1}
    with pytest.raises(ManifestUnsupported) as caught:
        parse_manifest(encode(body))
    assert caught.value.detail == {"mediaType": schema1}


@pytest.mark.parametrize(
    "content_type",
    [OCI_MANIFEST.upper(), "Application/Vnd.Oci.Image.Manifest.v1+JSON; charset=x"],
)
def test_content_type_case_insensitive(content_type: str) -> None:
    image = make_image()
    body = json.loads(image.manifest)
    del body["mediaType"]

    manifest = parse_manifest(encode(body), content_type)

    assert manifest.media_type == OCI_MANIFEST


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "UTF-8"),
        (b"{", "JSON"),
        (b"[]", "object"),
        (b'{"schemaVersion": 2, "mediaType": 7}', "mediaType"),
        (b'{"schemaVersion": 2, "mediaType": "text/plain"}', "unsupported"),
        (b'{"schemaVersion": 2}', "cannot tell"),
    ],
)
def test_malformed_bodies(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestInvalid, match=message):
        parse_manifest(raw)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"schemaVersion": 3}, "schemaVersion"),
        ({"schemaVersion": True}, "schemaVersion"),
        ({"config": None}, "config"),
        ({"config": {"mediaType": "x", "digest": "sha256:0", "size": 1}}, "config"),
        ({"layers": {}}, "layers"),
        ({"layers": [{"mediaType": "a/b", "digest": "nope", "size": 1}]}, "layers[0]"),
        (
            {
                "layers": [
                    {
                        "mediaType": "a/b",
                        "digest": str(Digest.of(b"x")),
                        "size": -1,
                    }
                ]
            },
            "layers[0].size",
        ),
        (
            {
                "layers": [
                    {
                        "mediaType": "a/b",
                        "digest": str(Digest.of(b"x")),
                        "size": 1.5,
                    }
                ]
            },
            "layers[0].size",
        ),
        ({"annotations": {"a": 1}}, "annotations"),
        ({"artifactType": "not a media type"}, "artifactType"),
        ({"subject": {"mediaType": OCI_MANIFEST, "size": 3}}, "subject"),
    ],
)
def test_invalid_fields_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(_image_body(**changes)))
    assert field in caught.value.message + json.dumps(caught.value.detail)


def test_index_platform_must_name_os_and_architecture() -> None:
    body = json.loads(make_index([make_image()]))
    body["manifests"][0]["platform"] = {"os": "linux"}
    with pytest.raises(ManifestInvalid, match="platform"):
        parse_manifest(encode(body))


def test_embedded_data_must_match() -> None:
    good = _image_body()
    good["config"]["data"] = base64.b64encode(b"{}").decode()
    good["config"]["digest"] = str(Digest.of(b"{}"))
    good["config"]["size"] = 2
    parse_manifest(encode(good))
    bad = json.loads(encode(good))
    bad["config"]["data"] = base64.b64encode(b"[]").decode()
    with pytest.raises(ManifestInvalid, match="data"):
        parse_manifest(encode(bad))


def test_foreign_layers_not_required() -> None:
    body = _image_body()
    body["layers"].append(
        {
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": str(Digest.of(b"windows")),
            "size": 7,
            "urls": ["https://example.invalid/layer"],
        }
    )
    references = parse_manifest(encode(body)).references()
    assert [r.required for r in references] == [True, True, False]


@pytest.mark.parametrize("url", ["", "/layer", "example.invalid/layer", "http://a b"])
def test_foreign_layer_url_not_uri(url: str) -> None:
    body = _image_body()
    body["layers"].append(
        {
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": str(Digest.of(b"windows")),
            "size": 7,
            "urls": ["https://example.invalid/layer", url],
        }
    )

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body))

    assert caught.value.detail == {"field": "layers[1].urls[1]", "url": url}
    stored = parse_stored_manifest(encode(body), OCI_MANIFEST)
    assert stored.references()[2].descriptor.urls[1] == url


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.invalid/layer",
        "data:application/octet-stream;base64,AAAA",
        "https:/layer",
        "http:///layer",
    ],
)
def test_foreign_layer_url_not_http(url: str) -> None:
    body = _image_body()
    body["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "digest": str(Digest.of(b"windows")),
            "size": 7,
            "urls": ["https://example.invalid/layer", url],
        }
    )

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body))

    assert caught.value.detail == {"field": "layers[1].urls[1]", "url": url}
    assert "http or https" in caught.value.message
    stored = parse_stored_manifest(encode(body), OCI_MANIFEST)
    assert stored.references()[2].descriptor.urls[1] == url


@pytest.mark.parametrize(
    "url",
    [
        "http://example.invalid/layer",
        "https://example.invalid:8443/v2/layer?token=a#part",
        "HTTPS://EXAMPLE.INVALID/layer",
        "https://user@[2001:db8::1]/layer",
    ],
)
def test_foreign_layer_url_http_accepted(url: str) -> None:
    body = _image_body()
    body["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "digest": str(Digest.of(b"windows")),
            "size": 7,
            "urls": [url],
        }
    )

    references = parse_manifest(encode(body)).references()

    assert references[2].descriptor.urls == (url,)
    assert references[2].required is False


def test_config_url_not_http() -> None:
    body = _image_body()
    body["config"]["urls"] = ["ftp://example.invalid/config"]

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body))

    assert caught.value.detail == {
        "field": "config.urls[0]",
        "url": "ftp://example.invalid/config",
    }


def test_index_child_url_not_uri() -> None:
    body = _index_body()
    body["manifests"][0]["urls"] = ["\u00e9"]

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body))

    assert caught.value.detail == {"field": "manifests[0].urls[0]", "url": "\u00e9"}


def test_size_limit() -> None:
    body = _image_body(annotations={"pad": "x" * MAX_MANIFEST_SIZE})
    with pytest.raises(ManifestTooLarge) as caught:
        parse_manifest(encode(body))
    assert caught.value.detail["limit"] == MAX_MANIFEST_SIZE


def test_sha512_digest() -> None:
    image = make_image()
    manifest = parse_manifest(image.manifest, algorithm="sha512")
    assert manifest.digest == Digest.of(image.manifest, "sha512")


def _index_body(media_type: str = OCI_INDEX, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(make_index([make_image()]))
    body["mediaType"] = media_type
    body.update(changes)
    return body


def _docker_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(make_image(docker=True).manifest)
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("build", "field", "media_type"),
    [
        (lambda: _image_body(manifests=[]), "manifests", OCI_MANIFEST),
        (lambda: _image_body(manifests=None), "manifests", OCI_MANIFEST),
        (
            lambda: _image_body(manifests=_index_body()["manifests"]),
            "manifests",
            OCI_MANIFEST,
        ),
        (lambda: _docker_body(manifests=[]), "manifests", DOCKER_MANIFEST),
        (lambda: _index_body(config=_image_body()["config"]), "config", OCI_INDEX),
        (lambda: _index_body(layers=[]), "layers", OCI_INDEX),
        (lambda: _index_body(layers=None), "layers", OCI_INDEX),
        (
            lambda: _index_body(DOCKER_MANIFEST_LIST, layers=[]),
            "layers",
            DOCKER_MANIFEST_LIST,
        ),
        (
            lambda: _index_body(DOCKER_MANIFEST_LIST, config={}),
            "config",
            DOCKER_MANIFEST_LIST,
        ),
    ],
    ids=[
        "oci-manifest-empty-manifests",
        "oci-manifest-null-manifests",
        "oci-manifest-full-manifests",
        "docker-manifest-manifests",
        "oci-index-config",
        "oci-index-layers",
        "oci-index-null-layers",
        "docker-list-layers",
        "docker-list-config",
    ],
)
def test_other_kind_field_rejected(build: Any, field: str, media_type: str) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(build()))
    assert caught.value.detail == {"field": field, "mediaType": media_type}
    assert field in caught.value.message
    assert media_type in caught.value.message


def _both_kinds_without_media_type() -> bytes:
    body = _image_body(manifests=[])
    del body["mediaType"]
    return encode(body)


@pytest.mark.parametrize(
    ("content_type", "field"),
    [
        (OCI_MANIFEST, "manifests"),
        # A Docker body must name its mediaType before its fields count.
        (DOCKER_MANIFEST, "mediaType"),
        (OCI_INDEX, "config"),
        (DOCKER_MANIFEST_LIST, "mediaType"),
        ("application/json", "manifests"),
        (None, "manifests"),
    ],
)
def test_kind_from_content_type_checks_fields(
    content_type: str | None, field: str
) -> None:
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(_both_kinds_without_media_type(), content_type)
    assert caught.value.detail["field"] == field


def test_index_sent_as_image_manifest() -> None:
    body = _index_body()
    del body["mediaType"]
    assert parse_manifest(encode(body), OCI_INDEX).media_type == OCI_INDEX
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body), OCI_MANIFEST)
    assert caught.value.detail == {"field": "manifests", "mediaType": OCI_MANIFEST}


def _with_duplicate(raw: bytes, first: bytes, key: bytes) -> bytes:
    """Insert ``"key": value`` before the first occurrence of ``first``."""
    assert raw.count(first) >= 1
    return raw.replace(first, key + b", " + first, 1)


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (
            lambda raw: _with_duplicate(
                raw,
                b'"digest"',
                b'"digest": "' + str(Digest.of(b"missing")).encode() + b'"',
            ),
            "digest",
        ),
        (
            lambda raw: _with_duplicate(
                raw, b'"schemaVersion"', b'"mediaType": "' + OCI_INDEX.encode() + b'"'
            ),
            "mediaType",
        ),
        (lambda raw: _with_duplicate(raw, b'"layers"', b'"layers": []'), "layers"),
        (
            lambda raw: raw.replace(
                b'"schemaVersion"',
                b'"annotations": {"k": "a", "k": "b"}, "schemaVersion"',
                1,
            ),
            "k",
        ),
    ],
    ids=["config-digest", "media-type", "layers", "annotation"],
)
def test_duplicate_keys_rejected(build: Any, key: str) -> None:
    raw = build(make_image().manifest)
    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(raw)
    assert caught.value.detail == {"key": key}
    assert repr(key) in caught.value.message


def _nested(kind: str, levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value} if kind == "object" else [value]
    return value


@pytest.mark.parametrize("kind", ["object", "array"])
def test_nesting_limit_inside_a_field(kind: str) -> None:
    # The body is level 1 and the field's value starts at level 2.
    deepest_allowed = _image_body(extra=_nested(kind, MAX_NESTING - 1))
    parse_manifest(encode(deepest_allowed))
    too_deep = _image_body(extra=_nested(kind, MAX_NESTING))
    with pytest.raises(ManifestInvalid, match="nests deeper") as caught:
        parse_manifest(encode(too_deep))
    assert caught.value.detail == {"limit": MAX_NESTING}


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"a":[' * 50_000 + b"1" + b"]}" * 50_000,
    ],
    ids=["arrays", "objects", "mixed"],
)
def test_deep_nesting_reports_limit(raw: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="nests deeper") as caught:
        parse_manifest(raw)
    assert caught.value.detail == {"limit": MAX_NESTING}


@pytest.mark.parametrize("content_type", [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
def test_docker_body_without_media_type(content_type: str) -> None:
    body = _index_body() if content_type == DOCKER_MANIFEST_LIST else _image_body()
    del body["mediaType"]

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body), content_type)

    assert caught.value.detail == {"field": "mediaType", "contentType": content_type}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_rejected(literal: str) -> None:
    raw = encode(_image_body())[:-1] + b', "x": ' + literal.encode() + b"}"

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(raw, OCI_MANIFEST)

    assert caught.value.message == "manifest is not valid JSON"
    assert caught.value.detail == {"error": f"{literal} is not a JSON value"}


@pytest.mark.parametrize("literal", ["1e999", "-1e999", "1.5E+400"])
def test_float_overflow_rejected(literal: str) -> None:
    raw = encode(_image_body())[:-1] + b', "x": ' + literal.encode() + b"}"

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(raw, OCI_MANIFEST)

    assert "64-bit float" in caught.value.message
    assert caught.value.detail == {"number": literal}


def test_stored_float_overflow_parses() -> None:
    # Earlier cairn versions stored such manifests, so reading one must work.
    raw = encode(_image_body())[:-1] + b', "x": 1e999}'

    parsed = parse_stored_manifest(raw, OCI_MANIFEST)

    assert parsed.body["x"] == float("inf")


@pytest.mark.parametrize(
    ("path", "key", "field"),
    [
        ((), "Layers", "layers"),
        ((), "Manifests", "manifests"),
        ((), "MEDIATYPE", "mediaType"),
        (("config",), "Digest", "digest"),
        (("layers", 0), "SIZE", "size"),
        # The long s folds to "s" in Go's matching and in str.casefold.
        (("config",), "\u017fize", "size"),
    ],
)
def test_key_spelled_in_other_case(
    path: tuple[str | int, ...], key: str, field: str
) -> None:
    body = _image_body()
    target: Any = body
    for step in path:
        target = target[step]
    target[key] = target.get(field, [])

    with pytest.raises(ManifestInvalid) as caught:
        parse_manifest(encode(body), OCI_MANIFEST)
    assert caught.value.detail == {"key": key, "field": field}


def test_annotation_keys_keep_their_case() -> None:
    body = _image_body()
    body["annotations"] = {"Size": "large", "Digest": "kept as written"}

    manifest = parse_manifest(encode(body), OCI_MANIFEST)

    assert manifest.media_type == OCI_MANIFEST


def _older_manifests() -> list[OlderManifest]:
    image = make_image(layer_count=2)
    return [
        *image_manifests(image).values(),
        docker_without_media_type(make_image(docker=True)),
        *index_manifests(image).values(),
    ]


@pytest.mark.parametrize("manifest", _older_manifests(), ids=lambda m: m.rule)
def test_stored_manifest_parses_as_stored(manifest: OlderManifest) -> None:
    with pytest.raises(ManifestInvalid):
        parse_manifest(manifest.raw, manifest.media_type)

    parsed = parse_stored_manifest(manifest.raw, manifest.media_type)

    assert parsed.media_type == manifest.media_type
    assert parsed.raw == manifest.raw
    assert parsed.digest == manifest.digest
    found = [
        (r.kind, str(r.descriptor.digest), r.descriptor.size)
        for r in parsed.references()
    ]
    expected = [(r["kind"], r["digest"], r["size"]) for r in manifest.references]
    assert found == expected


def test_stored_manifest_keeps_other_checks() -> None:
    body = _image_body()
    del body["config"]
    with pytest.raises(ManifestInvalid, match="config is missing"):
        parse_stored_manifest(encode(body), OCI_MANIFEST)

    schema1 = encode({"schemaVersion": 1, "name": "app", "fsLayers": []})
    with pytest.raises(ManifestUnsupported):
        parse_stored_manifest(schema1, None)

    index = encode(_index_body())
    with pytest.raises(ManifestInvalid, match="does not match the Content-Type"):
        parse_stored_manifest(index, OCI_MANIFEST)
