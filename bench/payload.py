"""Blob contents and OCI image layouts that the workloads push."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_TAR_BLOCK = 512
_TAR_END = 2 * _TAR_BLOCK


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_random_file(path: Path, size: int) -> str:
    """Write size random bytes to path and return their digest."""
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        remaining = size
        while remaining > 0:
            chunk = os.urandom(min(MIB, remaining))
            digest.update(chunk)
            file.write(chunk)
            remaining -= len(chunk)
    return "sha256:" + digest.hexdigest()


def stamped_chunks(seed: int, size: int) -> Iterator[memoryview]:
    """Yield size bytes of seeded pseudo-random data in 1 MiB chunks.

    Each chunk is one random 1 MiB block with (seed, chunk index) written over
    its first 16 bytes, so no two chunks are equal and no bytes are kept on disk.
    The same seed gives the same bytes. The yielded view is reused, so a consumer
    must finish with a chunk before asking for the next.
    """
    block = bytearray(random.Random(seed).randbytes(MIB))
    view = memoryview(block)
    index = 0
    remaining = size
    while remaining > 0:
        struct.pack_into("<QQ", block, 0, seed, index)
        length = min(MIB, remaining)
        yield view[:length]
        remaining -= length
        index += 1


def stamped_digest(seed: int, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in stamped_chunks(seed, size):
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def _tar_header(name: str, payload_size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = payload_size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def tar_payload_size(tar_size: int) -> int:
    """Return the file size that makes a one-file tar exactly tar_size bytes.

    The tar is a 512-byte header, the file, and two zero blocks. tar_size must be
    a multiple of 512 so that the file needs no padding.
    """
    if tar_size % _TAR_BLOCK or tar_size < _TAR_BLOCK + _TAR_END:
        raise ValueError(f"tar size {tar_size} is not a multiple of 512 above 1536")
    return tar_size - _TAR_BLOCK - _TAR_END


def write_tar_layer(path: Path, tar_size: int) -> str:
    """Write an uncompressed tar of one random file, tar_size bytes in all.

    Returns the tar's digest, which is also its diff_id because it is not
    compressed.
    """
    payload_size = tar_payload_size(tar_size)
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        header = _tar_header("payload.bin", payload_size)
        digest.update(header)
        file.write(header)
        remaining = payload_size
        while remaining > 0:
            chunk = os.urandom(min(MIB, remaining))
            digest.update(chunk)
            file.write(chunk)
            remaining -= len(chunk)
        trailer = bytes(_TAR_END)
        digest.update(trailer)
        file.write(trailer)
    return "sha256:" + digest.hexdigest()


def small_tar_layer(tar_size: int) -> bytes:
    payload = os.urandom(tar_payload_size(tar_size))
    return _tar_header("payload.bin", len(payload)) + payload + bytes(_TAR_END)


def image_config(diff_ids: list[str]) -> bytes:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(config, sort_keys=True).encode()


def image_manifest(
    config: Descriptor,
    layers: list[Descriptor],
    annotations: dict[str, str] | None = None,
) -> bytes:
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = annotations
    return json.dumps(manifest, sort_keys=True).encode()


class OciLayoutWriter:
    """Builds an OCI image layout directory with one tagged image manifest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    def add_bytes(self, media_type: str, data: bytes) -> Descriptor:
        digest = sha256_digest(data)
        self.blob_path(digest).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def add_big_tar_layer(self, tar_size: int) -> Descriptor:
        scratch = self.blobs / "layer.partial"
        digest = write_tar_layer(scratch, tar_size)
        scratch.rename(self.blob_path(digest))
        return Descriptor(OCI_LAYER_TAR, digest, tar_size)

    def finish(self, layers: list[Descriptor], tag: str) -> Descriptor:
        """Write the config, manifest and index.json, and return the manifest."""
        config = self.add_bytes(OCI_CONFIG, image_config([d.digest for d in layers]))
        manifest = self.add_bytes(OCI_MANIFEST, image_manifest(config, layers))
        entry = manifest.to_json()
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        (self.root / "index.json").write_text(json.dumps(index))
        return manifest


def read_layout_manifest_digest(root: Path) -> str:
    index = json.loads((root / "index.json").read_text())
    return str(index["manifests"][0]["digest"])
