"""Builders for blobs, configs and manifests used across the tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from engine.domain.digest import Digest
from engine.domain.manifests import (
    DOCKER_MANIFEST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": str(Digest.of(data)),
        "size": len(data),
        **extra,
    }


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


@dataclass
class Image:
    """An image's config, layers and manifest bytes."""

    config: bytes
    layers: list[bytes]
    manifest: bytes
    media_type: str = OCI_MANIFEST
    blobs: list[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.blobs = [self.config, *self.layers]

    @property
    def digest(self) -> Digest:
        return Digest.of(self.manifest)


def make_image(
    layer_count: int = 1,
    layer_size: int = 1024,
    *,
    docker: bool = False,
    seed: bytes | None = None,
    annotations: dict[str, str] | None = None,
) -> Image:
    """Build an image of random layers; ``docker`` selects Docker schema 2."""
    layers = [os.urandom(layer_size) for _ in range(layer_count)]
    config = encode(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {
                "type": "layers",
                "diff_ids": [str(Digest.of(layer)) for layer in layers],
            },
            "seed": (seed or os.urandom(8)).hex(),
        }
    )
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": [
            descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer) for layer in layers
        ],
    }
    if annotations:
        document["annotations"] = annotations
    return Image(config, layers, encode(document), media_type)


def make_index(
    children: list[Image], platforms: list[dict[str, str]] | None = None
) -> bytes:
    platforms = platforms or [
        {"architecture": f"arch{i}", "os": "linux"} for i in range(len(children))
    ]
    return encode(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(child.media_type, child.manifest, platform=platform)
                for child, platform in zip(children, platforms, strict=True)
            ],
        }
    )


EMPTY_CONFIG = b"{}"


def make_artifact(
    subject: Image | bytes,
    artifact_type: str,
    payload: bytes,
    annotations: dict[str, str] | None = None,
) -> Image:
    """Build an artifact manifest with the empty config that refers to ``subject``.

    ``annotations`` replaces the default creation-time annotation.
    """
    subject_bytes = subject.manifest if isinstance(subject, Image) else subject
    subject_type = subject.media_type if isinstance(subject, Image) else OCI_MANIFEST
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(OCI_EMPTY, EMPTY_CONFIG),
        "layers": [descriptor("application/octet-stream", payload)],
        "subject": descriptor(subject_type, subject_bytes),
        "annotations": annotations
        or {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    }
    return Image(EMPTY_CONFIG, [payload], encode(document))
