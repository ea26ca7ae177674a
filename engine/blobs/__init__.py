"""Content-addressed blob storage and upload staging."""

from engine.blobs.store import BlobStore, StagedBlob

__all__ = ["BlobStore", "StagedBlob"]
