"""Manifests that earlier cairn versions stored and the current checks reject,
and a way to store them as those versions did: content row, manifest.pushed
and tag.set appended together, without the parse that a push runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from engine.domain.digest import Digest
from engine.domain.events import EventType
from engine.domain.manifests import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from engine.registry import Registry
from engine.tables import manifest_contents
from tests.images import Image, descriptor, encode


@dataclass(frozen=True)
class OlderManifest:
    """Manifest bytes with the media type and references an earlier cairn
    recorded for them. ``rule`` names the check that rejects them today."""

    rule: str
    raw: bytes
    media_type: str
    references: list[dict[str, Any]]

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)


def _image_references(image: Image) -> list[dict[str, Any]]:
    body = json.loads(image.manifest)
    references = [_reference("config", body["config"])]
    references += [_reference("layer", layer) for layer in body["layers"]]
    return references


def _reference(kind: str, value: dict[str, Any]) -> dict[str, Any]:
    reference = {
        "kind": kind,
        "media_type": value["mediaType"],
        "digest": value["digest"],
        "size": value["size"],
    }
    if "platform" in value:
        reference["platform"] = value["platform"]
    return reference


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def image_manifests(image: Image) -> dict[str, OlderManifest]:
    """Return, by rule, image manifests that reference the blobs of the OCI
    image ``image``, each of which one of today's checks rejects."""
    body = json.loads(image.manifest)
    references = _image_references(image)
    missing = str(Digest.of(b"a blob no repository holds"))
    raw = {
        "other-kind-field": encode({**body, "manifests": []}),
        # json.loads, and the earlier cairn with it, keeps the last value.
        "repeated-key": image.manifest.replace(
            b'"digest"', b'"digest": "' + missing.encode() + b'", "digest"', 1
        ),
        "key-in-other-case": encode({"Layers": [], **body}),
        "nan": image.manifest[:-1] + b', "x": NaN}',
        "deep-nesting": encode({**body, "x": _nested(100)}),
    }
    return {
        rule: OlderManifest(rule, content, OCI_MANIFEST, references)
        for rule, content in raw.items()
    }


def docker_without_media_type(image: Image) -> OlderManifest:
    """Return the Docker image ``image`` without mediaType in its body."""
    body = json.loads(image.manifest)
    assert body.pop("mediaType") == DOCKER_MANIFEST
    return OlderManifest(
        "docker-without-media-type",
        encode(body),
        DOCKER_MANIFEST,
        _image_references(image),
    )


def index_manifests(child: Image) -> dict[str, OlderManifest]:
    """Return, by rule, indexes of ``child`` that today's checks reject."""
    entry = descriptor(
        child.media_type,
        child.manifest,
        platform={"architecture": "amd64", "os": "linux"},
    )
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    # The platform is copied into the event's payload, NaN included.
    odd = {**entry, "platform": {**entry["platform"], "variant": float("nan")}}
    return {
        "index-other-kind-field": OlderManifest(
            "index-other-kind-field",
            encode({**body, "layers": []}),
            OCI_INDEX,
            [_reference("manifest", entry)],
        ),
        "index-nan-platform": OlderManifest(
            "index-nan-platform",
            encode({**body, "manifests": [odd]}),
            OCI_INDEX,
            [_reference("manifest", odd)],
        ),
    }


def descriptor_manifests(image: Image) -> dict[str, OlderManifest]:
    """Return, by rule, manifests whose descriptors give another size or
    media type than the repository stores for the OCI image ``image`` or
    its blobs, as the checks on new pushes compare them. The image and its
    blobs must be stored beside them."""
    body = json.loads(image.manifest)
    child = descriptor(
        OCI_INDEX, image.manifest, platform={"architecture": "amd64", "os": "linux"}
    )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}
    larger_child = {**child, "mediaType": image.media_type, "size": child["size"] + 1}

    # A referrer of the image: the image's own fields, and a subject
    # descriptor that gives the image as a Docker manifest.
    subject = descriptor(DOCKER_MANIFEST, image.manifest)

    larger_layer = {**body["layers"][0], "size": body["layers"][0]["size"] + 1}
    layer_body = {**body, "layers": [larger_layer, *body["layers"][1:]]}

    cases = {
        "index-child-media-type": (encode(index), OCI_INDEX),
        "index-child-size": (encode({**index, "manifests": [larger_child]}), OCI_INDEX),
        "subject-media-type": (encode({**body, "subject": subject}), OCI_MANIFEST),
        "layer-size": (encode(layer_body), OCI_MANIFEST),
    }

    manifests: dict[str, OlderManifest] = {}
    for rule, (raw, media_type) in cases.items():
        document = json.loads(raw)
        if media_type == OCI_INDEX:
            references = [_reference("manifest", d) for d in document["manifests"]]
        else:
            references = [_reference("config", document["config"])]
            references += [_reference("layer", d) for d in document["layers"]]
        if "subject" in document:
            references.append(_reference("subject", document["subject"]))
        manifests[rule] = OlderManifest(rule, raw, media_type, references)
    return manifests


def store_as_earlier_cairn(
    registry: Registry,
    repository: str,
    manifest: OlderManifest,
    tag: str | None = None,
) -> None:
    """Store ``manifest`` in ``repository`` as an earlier cairn stored a push
    of it, and point ``tag`` at it. Its blobs and children must be there."""
    repo = registry.repository(repository)
    digest = str(manifest.digest)
    blob_sizes = sum(
        reference["size"]
        for reference in manifest.references
        if reference["kind"] in ("config", "layer")
    )
    config = next(
        (r["media_type"] for r in manifest.references if r["kind"] == "config"), None
    )
    subject = next(
        (r["digest"] for r in manifest.references if r["kind"] == "subject"), None
    )
    events = [
        repo.event(
            EventType.MANIFEST_PUSHED,
            digest=digest,
            media_type=manifest.media_type,
            size=len(manifest.raw),
            artifact_type=config,
            subject=subject,
            annotations=None,
            references=manifest.references,
            content_size=len(manifest.raw) + blob_sizes,
        )
    ]
    if tag is not None:
        events.append(
            repo.event(EventType.TAG_SET, tag=tag, digest=digest, previous=None)
        )
    with registry.database.write() as conn:
        stored = conn.execute(
            sa.select(manifest_contents.c.digest).where(
                manifest_contents.c.digest == digest
            )
        ).first()
        if stored is None:
            conn.execute(
                sa.insert(manifest_contents).values(digest=digest, content=manifest.raw)
            )
        repo.commit(conn, events)
